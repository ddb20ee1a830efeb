"""Format conversion (Hugging Face directory <-> Orbax) and `inspect`: whole-checkpoint operations over io."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np

from ftjax.config import ModelConfig, read_config
from ftjax.errors import FtjaxError
from ftjax.io.checkpoint import DIFF_MARKER, HFCheckpoint, resolve_model_path, save_hf
from ftjax.io.orbax import (is_orbax_dir, is_train_checkpoint, read_manifest, restore_orbax, restore_train_params,
                            save_orbax, verify_step)
from ftjax.layout import LM_HEAD, Layout


def convert(src: str | Path, dst: str | Path, *, to: str, overwrite: bool = False) -> Path:
    """HF directory -> ftjax Orbax directory (`to="orbax"`) or back (`to="hf"`); tensors bit-exact.

    config.json and the tokenizer / generation files travel along verbatim. A redundant `lm_head.weight`
    of a tied model is dropped, as the HF writer would. `to="hf"` also exports an `ftjax finetune` training
    checkpoint RUN/checkpoints/STEP: its float32 master weights, with the config (dtype float32) and tokenizer of
    the run's init model (RUN/run.json).
    """
    dst = Path(dst)
    if to == "orbax":
        ckpt = HFCheckpoint(src)
        cfg = ModelConfig.from_hf(ckpt.config)
        flat = {n: np.asarray(ckpt.get(n)) for n in Layout.of_checkpoint(ckpt).names}
        Layout.of_model(cfg).check(flat, source=str(ckpt.path))
        return save_orbax(flat, dst, config=ckpt.config, aux_from=ckpt.path, overwrite=overwrite, inputs=[ckpt.path])
    if to == "hf":
        src = Path(src)
        if is_train_checkpoint(src):
            return _export_train_checkpoint(src, dst, overwrite=overwrite)
        if not is_orbax_dir(src):
            raise FtjaxError(f"{src} is not an ftjax Orbax checkpoint; convert a Hugging Face directory with --to orbax")
        config, flat = restore_orbax(src)
        tensors = {n: np.asarray(x) for n, x in flat.items()}
        Layout.of_model(ModelConfig.from_hf(config)).check(tensors, source=str(src))
        return save_hf(dst, tensors, config=config, aux_from=src, overwrite=overwrite, inputs=[src])
    raise FtjaxError(f"unknown conversion target {to!r}; use 'orbax' or 'hf'")


def _export_train_checkpoint(step_dir: Path, dst: Path, *, overwrite: bool) -> Path:
    """RUN/checkpoints/STEP -> a float32 Hugging Face directory, config and tokenizer from RUN's init model."""
    import json

    from ftjax.params import save_params
    from ftjax.runlog import RUN_FILE

    record_file = step_dir.parent.parent / RUN_FILE
    try:
        init = json.loads(record_file.read_text())["init"]
    except (OSError, ValueError, KeyError, TypeError):
        raise FtjaxError(f"{step_dir}: no readable {record_file} naming the run's init model (its config and "
                         "tokenizer); export a checkpoint from inside its `ftjax finetune` run directory") from None
    if not Path(init).is_dir():
        raise FtjaxError(f"{step_dir}: the run's init model {init} (from {record_file}) is gone; its config and "
                         "tokenizer are needed to export the checkpoint; restore it at that path")
    problem = verify_step(step_dir)
    if problem is not None:
        raise FtjaxError(f"{step_dir}: not a whole checkpoint ({problem}); export another step of the run")
    config = HFCheckpoint(init).config
    params = restore_train_params(step_dir)
    return save_params(params, dst, config=config, aux_from=init, dtype="float32", overwrite=overwrite,
                       inputs=[step_dir])


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """Summary of a checkpoint (HF directory, cached Hub id, or ftjax Orbax directory) as a JSON-able dict."""
    if is_orbax_dir(path):
        import json

        config = json.loads((Path(path) / "config.json").read_text())
        shapes = {n: (dt, shape) for n, (dt, shape) in read_manifest(path).items()}
        files = [str(Path(path) / "params")]
        kind = "orbax"
    elif (resolve_model_path(path) / DIFF_MARKER).is_file():
        return _inspect_diff(HFCheckpoint(resolve_model_path(path), allow_diff=True))
    else:
        ckpt = HFCheckpoint(resolve_model_path(path))
        config = ckpt.config
        shapes = {n: (ckpt.info(n).dtype, ckpt.info(n).shape) for n in ckpt.names()}
        files = [f.name for f in ckpt.files]
        kind = "huggingface"
        path = ckpt.path
    report = read_config(config, source=f"{path}/config.json")
    cfg = report.config
    dtypes: dict[str, int] = collections.Counter()
    params = nbytes = 0
    for dt, shape in shapes.values():
        n = int(np.prod(shape, dtype=np.int64))
        params += n
        nbytes += n * np.dtype(dt).itemsize
        dtypes[str(np.dtype(dt))] += n
    return {
        "path": str(path),
        "format": kind,
        "family": cfg.model_type,
        "architecture": ", ".join(config.get("architectures") or [cfg.model_type]),
        "parameters": params,
        "bytes": nbytes,
        "dtypes": dict(dtypes),
        "tensors": len(shapes),
        "tied_embeddings": cfg.tie_word_embeddings,
        "lm_head_in_file": LM_HEAD in shapes,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": f"{cfg.num_attention_heads} query / {cfg.num_key_value_heads} kv, head_dim {cfg.head_dim}",
        "vocab_size": cfg.vocab_size,
        "files": files,
        "ignored_config_keys": list(report.ignored),  # keys transformers' modeling code never reads (inert)
        "config_notes": list(report.notes),
    }


def _inspect_diff(ckpt: HFCheckpoint) -> dict[str, Any]:
    """A diff directory written by `ftjax diff`: what it is the difference of, its dtype, size and norms."""
    import json

    meta_path = ckpt.path / DIFF_MARKER
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise FtjaxError(f"{meta_path}: not valid JSON ({e})") from None
    infos = [ckpt.info(n) for n in ckpt.names()]
    norms = meta.get("norms", {})
    largest = sorted(norms.get("tensors", {}).items(), key=lambda kv: -kv[1])[:5]
    return {
        "path": str(ckpt.path),
        "format": "ftjax-diff",
        "diff_of": f"ft {meta.get('ft')} - base {meta.get('base')}",
        "dtype": meta.get("dtype"),
        "exact": meta.get("exact"),
        "tensors": len(infos),
        "parameters": sum(int(np.prod(i.shape, dtype=np.int64)) for i in infos),
        "bytes": sum(i.nbytes for i in infos),
        "norm": norms.get("total"),
        "largest_tensor_norms": {n: round(v, 6) for n, v in largest},
        "exact_remainders": len(meta.get("lo_tensors", [])),
        "apply_with": f"ftjax apply --target BASE --diff {ckpt.path} --out OUT",
    }
