"""Orbax checkpoints of HF-named parameter trees, with the config and tokenizer files beside them.

Layout of an ftjax Orbax directory:
    DIR/config.json, tokenizer files, generation_config.json ...   (copied verbatim)
    DIR/ftjax_orbax.json   {"format": "ftjax-orbax", "tensors": {name: {"dtype": ..., "shape": [...]}}}
    DIR/params/            an `orbax.checkpoint.StandardCheckpointer` checkpoint of the nested tree
The manifest lets a restore build its abstract target (shape, dtype, sharding) without reading Orbax
metadata, whose Python API moves between releases.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from ftjax.dtypes import is_float
from ftjax.errors import FtjaxError, about_file
from ftjax.io.checkpoint import ORBAX_MANIFEST, ORBAX_STEP_MARKER, RECORD_KEY, atomic_output_dir, copy_aux_files
from ftjax.io.safetensors import DTYPES, dtype_code

MANIFEST = ORBAX_MANIFEST


def is_orbax_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def is_train_checkpoint(path: str | Path) -> bool:
    """True for an `ftjax finetune` training checkpoint, RUN/checkpoints/STEP (an Orbax CheckpointManager step)."""
    return (Path(path) / ORBAX_STEP_MARKER).is_file() and (Path(path) / "state").is_dir()


STEP_COMPLETE = "ftjax_complete.json"  # written last into a training checkpoint: {file: [bytes, sha256]}


def _file_digests(step_dir: Path) -> dict[str, list]:
    import hashlib

    digests = {}
    ours = (STEP_COMPLETE, STEP_COMPLETE + ".tmp")
    for file in sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name not in ours):
        h = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digests[file.relative_to(step_dir).as_posix()] = [file.stat().st_size, h.hexdigest()]
    return digests


def mark_step_complete(step_dir: str | Path) -> None:
    """Record the size and SHA-256 of every file of a finished training checkpoint in STEP_COMPLETE, written last
    and atomically (a crash before it leaves a checkpoint that `verify_step` refuses)."""
    import os

    step_dir = Path(step_dir)
    tmp = step_dir / (STEP_COMPLETE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": "ftjax-step-complete", "files": _file_digests(step_dir)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / STEP_COMPLETE)


def verify_step(step_dir: str | Path) -> str | None:
    """None when a training checkpoint is whole (every file recorded by `mark_step_complete` is there with the
    same size and SHA-256); otherwise why not, in a few words."""
    step_dir = Path(step_dir)
    try:
        recorded = json.loads((step_dir / STEP_COMPLETE).read_text())["files"]
    except FileNotFoundError:
        return f"no {STEP_COMPLETE}: its save never completed"
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {STEP_COMPLETE}"
    actual = _file_digests(step_dir)
    for name, (size, digest) in recorded.items():
        if name not in actual:
            return f"{name} is missing"
        if actual[name][0] != size:
            return f"{name} has {actual[name][0]} bytes, {size} were written"
        if actual[name][1] != digest:
            return f"{name} does not match its checksum"
    return None


def restore_train_params(step_dir: str | Path) -> dict[str, Any]:
    """The float32 master parameters (a nested HF-named tree of host arrays) of an `ftjax finetune` training
    checkpoint RUN/checkpoints/STEP: its "state" item's "params". The whole train state is read (params and
    the two AdamW moments: about 3x the parameters' size in host memory)."""
    path = Path(step_dir) / "state"
    try:
        with ocp.StandardCheckpointer() as ckptr:
            state = ckptr.restore(path.absolute())
        return jax.tree.map(np.asarray, state["params"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FtjaxError(f"{path}: cannot restore the training checkpoint ({str(e).splitlines()[0]}); "
                         "use another step of the run") from None


def save_orbax(
    flat: Mapping[str, Any],
    out: str | Path,
    *,
    config: Mapping[str, Any],
    aux_from: str | Path | None = None,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
) -> Path:
    """Write flat HF-named tensors (numpy or jax arrays) as an ftjax Orbax directory, atomically."""
    from ftjax.params import nest  # local import: params imports io

    out = Path(out)
    manifest = {
        "format": "ftjax-orbax",
        "tensors": {n: {"dtype": dtype_code(np.dtype(x.dtype)), "shape": list(x.shape)} for n, x in flat.items()},
    }
    all_inputs = [Path(p) for p in inputs] + ([Path(aux_from)] if aux_from else [])
    with atomic_output_dir(out, overwrite=overwrite, inputs=all_inputs) as tmp:
        if aux_from is not None:
            copy_aux_files(Path(aux_from), tmp)
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")
        try:
            with ocp.StandardCheckpointer() as ckptr, about_file(out / "params"):
                ckptr.save((tmp / "params").absolute(), nest(dict(flat)))
        except OSError as e:
            raise FtjaxError(f"writing Orbax checkpoint {out}/params failed: {e.strerror or e}") from None
        manifest[RECORD_KEY] = sorted({p.name for p in tmp.iterdir()} | {MANIFEST})  # what --overwrite may replace
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def read_manifest(path: str | Path) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in an ftjax Orbax directory."""
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text())
        return {n: (DTYPES[t["dtype"]], tuple(t["shape"])) for n, t in manifest["tensors"].items()}
    except FileNotFoundError:
        raise FtjaxError(f"{path} is not an ftjax Orbax checkpoint (no {MANIFEST})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise FtjaxError(f"{file}: malformed manifest ({e})") from None


def restore_orbax(
    path: str | Path,
    *,
    dtype: Any = None,
    sharding_for: Callable[[str, tuple[int, ...]], jax.sharding.Sharding] | None = None,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """Restore (config dict, flat params) from an ftjax Orbax directory.

    dtype: cast floating tensors on restore. sharding_for(name, shape): target sharding of each leaf
    (default: the first device).
    """
    from ftjax.params import flatten, nest

    path = Path(path)
    tensors = read_manifest(path)
    config = json.loads((path / "config.json").read_text())
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {}
    for name, (dt, shape) in tensors.items():
        leaf_dtype = np.dtype(dtype) if dtype is not None and is_float(dt) else dt
        sharding = sharding_for(name, shape) if sharding_for else device
        abstract[name] = jax.ShapeDtypeStruct(shape, leaf_dtype, sharding=sharding)
    try:
        with ocp.StandardCheckpointer() as ckptr, about_file(path / "params"):
            restored = ckptr.restore((path / "params").absolute(), nest(abstract))
    except (OSError, ValueError) as e:
        raise FtjaxError(f"{path}/params: cannot restore Orbax checkpoint ({str(e).splitlines()[0]})") from None
    return config, flatten(restored)
