"""ftjax: fine-tuning transfer between LLM versions, in JAX.

The public API, imported lazily (so `ftjax --help` does not start JAX):

    Checkpoints   load_params, save_params, HFCheckpoint, convert, inspect_checkpoint, make_mesh, nest, flatten
    Model         ModelConfig, forward, init_params
    Transfer      ftjax.transfer.transfer (the module `ftjax.transfer` keeps its name), diff, apply,
                  transfer_params, and tree ops tree_diff, tree_add, tree_scale, tree_lerp, tree_norms, tree_cosine
    LoRA          transfer_lora (an adapter onto a base; `apply` takes adapters too), load_adapter,
                  extract_lora (a diff as an adapter)
    Merging       ftjax.merge.merge (a mergekit YAML config, streamed; the module keeps its name), merge_params
    Evaluation    evaluate_loss, generate_ids, evaluate_generation, render_chat
    Connectivity  scan, scan_along_diff, plane, barriers, diff_stats
    Training      TrainConfig, finetune, recycle
    Learned alpha ftjax.fit_alpha.fit_alpha (per-group α by gradient; the module keeps its name, as transfer and merge)
    Errors        FtjaxError
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from ftjax.errors import FtjaxError

_API = {
    "load_params": "ftjax.params",
    "save_params": "ftjax.params",
    "make_mesh": "ftjax.params",
    "nest": "ftjax.params",
    "flatten": "ftjax.params",
    "HFCheckpoint": "ftjax.io.checkpoint",
    "convert": "ftjax.convert",
    "inspect_checkpoint": "ftjax.convert",
    "ModelConfig": "ftjax.config",
    "forward": "ftjax.model",
    "init_params": "ftjax.model",
    "diff": "ftjax.transfer",
    "apply": "ftjax.transfer",
    "transfer_params": "ftjax.transfer",
    "tree_diff": "ftjax.treeops",
    "tree_add": "ftjax.treeops",
    "tree_scale": "ftjax.treeops",
    "tree_lerp": "ftjax.treeops",
    "tree_norms": "ftjax.treeops",
    "tree_cosine": "ftjax.treeops",
    "merge_params": "ftjax.merge",
    "transfer_lora": "ftjax.lora",
    "load_adapter": "ftjax.lora",
    "extract_lora": "ftjax.lora_extract",
    "evaluate_loss": "ftjax.evaluate",
    "generate_ids": "ftjax.generate",
    "evaluate_generation": "ftjax.generate",
    "render_chat": "ftjax.chat",
    "scan": "ftjax.lmc",
    "scan_along_diff": "ftjax.lmc",
    "plane": "ftjax.lmc",
    "barriers": "ftjax.lmc",
    "diff_stats": "ftjax.stats",
    "TrainConfig": "ftjax.train",
    "finetune": "ftjax.train",
    "recycle": "ftjax.recycle",
}

_SUBMODULES = {"transfer", "treeops", "params", "model", "config", "evaluate", "data", "lmc", "stats", "plots",
               "train", "recycle", "generate", "chat", "convert", "io", "demo", "streaming", "merge", "lora",
               "lora_extract", "fit_alpha"}

__all__ = ["FtjaxError", "__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"ftjax.{name}")
    raise AttributeError(f"module 'ftjax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
