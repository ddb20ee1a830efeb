"""Parameter pytrees with Hugging Face names: nest/flatten, load onto devices (optionally sharded), export.

The tree mirrors checkpoint names: `model.layers.3.mlp.up_proj.weight` is
`params["model"]["layers"]["3"]["mlp"]["up_proj"]["weight"]`, in the checkpoint's own `[out, in]` layout, so
transfer, interpolation and export are identity maps. `lm_head` is absent when embeddings are tied.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ftjax import dtypes
from ftjax.config import ModelConfig
from ftjax.errors import FtjaxError
from ftjax.io.checkpoint import HFCheckpoint, save_hf

Params = dict[str, Any]
LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"


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


def model_tensor_names(ckpt: HFCheckpoint, cfg: ModelConfig) -> list[str]:
    """Tensor names that form the parameter tree: the checkpoint's, minus a redundant tied `lm_head.weight`."""
    names = ckpt.names()
    if cfg.tie_word_embeddings and LM_HEAD in names:
        names = [n for n in names if n != LM_HEAD]
    return names


# ---------------------------------------------------------------------------------------------------------------
# Sharding: one small rule table from tensor names to PartitionSpecs over the mesh axes ("data", "fsdp").


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


# (name regex, rule). A rule maps (shape, fsdp size) to a PartitionSpec; first match wins.
def _shard_largest(shape: tuple[int, ...], n: int) -> PartitionSpec:
    """Shard the largest dimension that the fsdp axis divides; replicate if none does."""
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if n > 1 and shape[d] % n == 0:
            return PartitionSpec(*[("fsdp" if i == d else None) for i in range(len(shape))])
    return PartitionSpec()


def _replicate(shape: tuple[int, ...], n: int) -> PartitionSpec:
    return PartitionSpec()


SHARDING_RULES: list[tuple[str, Callable[[tuple[int, ...], int], PartitionSpec]]] = [
    (r"(norm|bias)$", _replicate),  # small vectors: replicate
    (r".*", _shard_largest),  # matrices and embeddings: FSDP over the largest divisible dim
]


def partition_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of tensor `name` under `SHARDING_RULES` on `mesh`."""
    n = mesh.shape.get("fsdp", 1)
    for pattern, rule in SHARDING_RULES:
        if re.search(pattern, name.removesuffix(".weight")):
            return rule(shape, n)
    return PartitionSpec()


def shardings_for(shapes: Mapping[str, tuple[int, ...]], mesh: Mesh) -> dict[str, NamedSharding]:
    """Flat name -> NamedSharding for every tensor."""
    return {n: NamedSharding(mesh, partition_spec(n, tuple(s), mesh)) for n, s in shapes.items()}


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
    names = model_tensor_names(ckpt, cfg)
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
    check_params(flat, cfg, source=str(ckpt.path))
    return cfg, nest(flat)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the model needs, with its shape, derived from the config alone."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    shapes: dict[str, tuple[int, ...]] = {EMBED: (cfg.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = {
            "q_proj.weight": (h * hd, d), "k_proj.weight": (kv * hd, d),
            "v_proj.weight": (kv * hd, d), "o_proj.weight": (d, h * hd),
        }
        if cfg.qkv_bias:
            attn.update({"q_proj.bias": (h * hd,), "k_proj.bias": (kv * hd,), "v_proj.bias": (kv * hd,)})
        if cfg.o_bias:
            attn["o_proj.bias"] = (d,)
        if cfg.qk_norm:
            attn.update({"q_norm.weight": (h * hd,), "k_norm.weight": (kv * hd,)})
        shapes.update({p + "self_attn." + k: v for k, v in attn.items()})
        mlp = {"gate_proj.weight": (f, d), "up_proj.weight": (f, d), "down_proj.weight": (d, f)}
        if cfg.mlp_bias:
            mlp.update({"gate_proj.bias": (f,), "up_proj.bias": (f,), "down_proj.bias": (d,)})
        shapes.update({p + "mlp." + k: v for k, v in mlp.items()})
        # OLMo 2 normalises sublayer outputs (post-norms) instead of inputs.
        norms = ("post_attention_layernorm", "post_feedforward_layernorm") if cfg.post_sublayer_norms else (
            "input_layernorm", "post_attention_layernorm")
        shapes.update({f"{p}{norm}.weight": (d,) for norm in norms})
    if not cfg.tie_word_embeddings:
        shapes[LM_HEAD] = (cfg.vocab_size, d)
    return shapes


def check_params(flat: Mapping[str, Any], cfg: ModelConfig, *, source: str) -> None:
    """Every expected tensor present with its expected shape, nothing unknown; one error lists all problems."""
    want = expected_shapes(cfg)
    problems = [f"missing {n}" for n in want if n not in flat]
    problems += [f"unexpected {n}" for n in flat if n not in want]
    problems += [
        f"{n} has shape {tuple(flat[n].shape)}, config says {want[n]}"
        for n in want if n in flat and tuple(flat[n].shape) != want[n]
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise FtjaxError(f"{source}: tensors do not match config.json: {shown}")


def save_params(
    params: Params,
    out: str | Path,
    *,
    config: Mapping[str, Any] | ModelConfig,
    aux_from: str | Path | None = None,
    dtype: Any = None,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
    max_shard_bytes: int = 5 * 10**9,
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
    check_params(flat, cfg, source="parameters to save")
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
