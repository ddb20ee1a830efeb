"""Parameter pytrees with Hugging Face names: nest/flatten, load onto devices (optionally sharded), export.

The tree mirrors checkpoint names: `model.layers.3.mlp.up_proj.weight` is
`params["model"]["layers"]["3"]["mlp"]["up_proj"]["weight"]`, in the checkpoint's own `[out, in]` layout, so
transfer, interpolation and export are identity maps. `lm_head` is absent when embeddings are tied.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from ftjax import dtypes
from ftjax.config import ModelConfig
from ftjax.errors import FtjaxError
from ftjax.io.checkpoint import DEFAULT_MAX_SHARD_BYTES, HFCheckpoint, save_hf
from ftjax.layout import LM_HEAD, Layout, partition_spec

Params = dict[str, Any]


def nest(flat: Mapping[str, Any]) -> Params:
    """`{"a.b.c": x}` -> `{"a": {"b": {"c": x}}}` (layer indices stay string keys)."""
    tree: Params = {}
    for name, leaf in flat.items():
        *parents, last = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise FtjaxError(f"tensor name {name!r} collides with another tensor's prefix")
        node[last] = leaf
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Inverse of `nest`: nested dict -> `{"a.b.c": leaf}`, in insertion order."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


# ---------------------------------------------------------------------------------------------------------------
# Meshes (the sharding rules of each tensor are in ftjax.layout).


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh from `"data=2,fsdp=4"` (or a dict). Default: every device on the `fsdp` axis, `data=1`.

    One axis size may be -1 (whatever is left). The product must equal the number of devices: in a multi-process
    run (ftjax.distributed) `jax.devices()` is every process's devices, so one mesh spans all hosts.
    """
    devices = list(devices if devices is not None else jax.devices())
    if spec is None:
        axes = {"data": 1, "fsdp": -1}
    elif isinstance(spec, str):
        axes = {}
        for part in spec.split(","):
            name, _, size = part.partition("=")
            try:
                axes[name.strip()] = int(size)
            except ValueError:
                raise FtjaxError(f"bad mesh spec {spec!r}: write axes as name=size, e.g. data=2,fsdp=4") from None
    else:
        axes = dict(spec)
    known = math.prod(v for v in axes.values() if v != -1)
    if list(axes.values()).count(-1) > 1 or known == 0 or len(devices) % known:
        raise FtjaxError(f"mesh {axes} does not fit {len(devices)} devices")
    axes = {k: (len(devices) // known if v == -1 else v) for k, v in axes.items()}
    if math.prod(axes.values()) != len(devices):
        raise FtjaxError(f"mesh {axes} uses {math.prod(axes.values())} devices but {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(tuple(axes.values())), tuple(axes))


# ---------------------------------------------------------------------------------------------------------------
# Load and save.


def _cast(x: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    return np.asarray(x) if dtype is None or x.dtype == dtype else np.asarray(x).astype(dtype)


def _index_key(index: tuple) -> tuple:
    """A hashable form of a tuple of slices (slices are unhashable before Python 3.12)."""
    return tuple((i.start, i.stop, i.step) if isinstance(i, slice) else i for i in index)


def _read_parts(ckpt: HFCheckpoint, name: str, leaf_dtype: np.dtype | None,
                sharding: NamedSharding | None) -> dict[tuple | None, np.ndarray]:
    """Host copies of what this process needs of tensor `name`: the whole tensor (no sharding) or each distinct slice
    its own devices hold. Copying (not viewing) the memmap is what makes the disk read happen here, in the
    read-ahead thread, instead of inside the host->device copy."""
    if sharding is None:
        view = ckpt.get(name)
        return {None: np.array(view) if leaf_dtype is None or view.dtype == leaf_dtype else view.astype(leaf_dtype)}
    parts: dict[tuple | None, np.ndarray] = {}
    for index in sharding.addressable_devices_indices_map(ckpt.info(name).shape).values():
        key = _index_key(index)
        if key not in parts:
            view = ckpt.get_slice(name, index)
            parts[key] = np.array(view) if leaf_dtype is None or view.dtype == leaf_dtype else view.astype(leaf_dtype)
    return parts


def load_params(
    path: str | Path, *, dtype: Any = None, mesh: Mesh | None = None, read_ahead: int = 2
) -> tuple[ModelConfig, Params]:
    """Load a Hugging Face checkpoint (local dir or cached Hub id) into a pytree of `jax.Array`s.

    dtype: cast floating tensors to this dtype (None keeps the checkpoint's); integer tensors are never cast.
    mesh: place leaves with `NamedSharding`s from `SHARDING_RULES`; each device gets only its own slice of the
    memory-mapped file, so in a multi-process run each process reads only the slices its own devices hold. Without a
    mesh, leaves go to this process's first device.
    read_ahead: tensors read from disk by a background thread ahead of the one being copied to the device, so disk
    reads overlap host->device copies (0: read inline). Peak extra host memory: about read_ahead tensors.
    """
    from concurrent.futures import ThreadPoolExecutor

    ckpt = HFCheckpoint(path)
    cfg = ModelConfig.from_hf(ckpt.config)
    names = Layout.of_checkpoint(ckpt).names
    target = None if dtype is None else np.dtype(jnp.dtype(dtype))
    jobs = []
    for name in names:  # header checks and shard opening here, in this thread, before any read-ahead
        info = ckpt.info(name)
        dtypes.check_computable(info.dtype, f"{ckpt.file_of(name)}: tensor {name}")
        leaf_dtype = target if target is not None and dtypes.is_float(info.dtype) else None
        sharding = None if mesh is None else NamedSharding(mesh, partition_spec(name, info.shape, mesh))
        jobs.append((name, info, leaf_dtype, sharding))
    flat: dict[str, jax.Array] = {}
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = [pool.submit(_read_parts, ckpt, job[0], job[2], job[3]) for job in jobs[:read_ahead]]
        for i, (name, info, leaf_dtype, sharding) in enumerate(jobs):
            parts = pending.pop(0).result() if read_ahead else _read_parts(ckpt, name, leaf_dtype, sharding)
            if read_ahead and i + read_ahead < len(jobs):
                nxt = jobs[i + read_ahead]
                pending.append(pool.submit(_read_parts, ckpt, nxt[0], nxt[2], nxt[3]))
            if sharding is None:
                flat[name] = jax.device_put(parts[None], jax.local_devices()[0])
            else:
                flat[name] = jax.make_array_from_callback(info.shape, sharding,
                                                          lambda index, parts=parts: parts[_index_key(index)])
    Layout.of_model(cfg).check(flat, source=str(ckpt.path))
    return cfg, nest(flat)


def save_params(
    params: Params,
    out: str | Path,
    *,
    config: Mapping[str, Any] | ModelConfig,
    aux_from: str | Path | None = None,
    dtype: Any = None,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Export a parameter tree as a Hugging Face directory (atomic; `lm_head.weight` omitted when tied).

    config: the `config.json` dict to write (or a ModelConfig, written through `to_hf()`).
    aux_from: a directory whose tokenizer / generation files are copied along.
    dtype: cast floating tensors to this dtype on the way out (None keeps each leaf's dtype).
    Multi-process: every process must call it (leaves sharded across processes are gathered); process 0 writes.
    """
    from ftjax.distributed import barrier, is_main, to_host

    config_dict = config.to_hf() if isinstance(config, ModelConfig) else dict(config)
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_hf(config_dict)
    flat = flatten(params)
    if cfg.tie_word_embeddings:
        flat.pop(LM_HEAD, None)
    Layout.of_model(cfg).check(flat, source="parameters to save")
    target = None if dtype is None else np.dtype(jnp.dtype(dtype))
    tensors = {}
    for name, leaf in flat.items():
        host = to_host(leaf)
        tensors[name] = _cast(host, target if dtypes.is_float(host.dtype) else None)
    if target is not None:
        config_dict["torch_dtype" if "torch_dtype" in config_dict else "dtype"] = str(np.dtype(target))
    aux = Path(aux_from) if aux_from is not None else None
    if is_main():
        save_hf(Path(out), tensors, config=config_dict, aux_from=aux, overwrite=overwrite,
                inputs=[Path(p) for p in inputs] + ([aux] if aux else []), max_shard_bytes=max_shard_bytes)
    barrier(f"ftjax.save_params:{Path(out).name}")
    return Path(out)
