#!/usr/bin/env python
"""The main job: `python scripts/transfer.py ...` is `ftjax transfer ...`; `--demo [ARGS]` is `ftjax demo [ARGS]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ftjax.cli import run  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--demo"]:
        run(["demo", *argv[1:]])
    run(["transfer", *argv])
