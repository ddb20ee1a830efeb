"""Results as JSON: one rule for what a result file holds (strict JSON: NaN and infinities become null) and who
writes it (process 0 of a multi-process run)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping


def finite_or_none(value: Any) -> Any:
    """JSON-safe copy of a result: NaN / inf become null (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def absolute_paths(paths: Mapping[str, str | Path]) -> dict[str, str]:
    """role -> absolute path (symlinks resolved) of each input path that exists here; others (a hub repo id not on
    disk) as given. Provenance records keep the paths as given and add these, so a record read from another
    directory still names its inputs."""
    return {role: str(Path(p).resolve()) if Path(p).exists() else str(p) for role, p in paths.items()}


def dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps` of `finite_or_none(value)`."""
    return json.dumps(finite_or_none(value), **kwargs)


def write_json(path: str | Path, value: Any) -> None:
    """Write a result as indented strict JSON (parents created); in a multi-process run only process 0 writes."""
    from ftjax.distributed import is_main

    if not is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(value, indent=1) + "\n")
