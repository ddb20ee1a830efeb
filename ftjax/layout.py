"""What tensors a checkpoint has and how each is treated: one rule for each, used by every engine.

- Names: the checkpoint's own (`model.layers.3.mlp.up_proj.weight`), in checkpoint order.
- Tying: a checkpoint ties its output embedding to `model.embed_tokens.weight` when its config's
  `tie_word_embeddings` says so, or, absent that key, when its family ties by default in transformers (SmolLM3,
  Gemma; PreTrainedConfig's True for families ftjax does not model); a tied checkpoint's redundant `lm_head.weight`
  is not one of its tensors. An untied checkpoint without `lm_head.weight` is refused (transformers would start
  that head at random). Whatever plays the output embedding is `Layout.lm_head` (the embedding when tied).
- Vocabulary tensors (`is_vocab`) have one row per token: they may differ in rows between versions.
- Floating tensors are the ones engines compute with (`ftjax.dtypes`); integer/bool ones are carried verbatim.
- The tensors a model needs, with shapes, come from the model's own parameter tree (`model.param_shapes`), never
  from a second hand-written list.
- Sharding: `partition_spec` over the mesh axes ("data", "fsdp").
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ftjax import dtypes
from ftjax.errors import FtjaxError, first_few
from ftjax.families import is_tied

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def is_vocab(name: str) -> bool:
    """Tensors with one row per vocabulary entry (the input and output embeddings)."""
    return name in (EMBED, LM_HEAD) or name.endswith((".embed_tokens.weight", ".wte.weight"))


@dataclasses.dataclass(frozen=True)
class Layout:
    """The tensors of one checkpoint (or of the model a config defines): names in order, shapes, dtypes, tying."""

    names: tuple[str, ...]
    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, np.dtype]
    tied: bool

    @classmethod
    def of_checkpoint(cls, ckpt: Any) -> Layout:
        """From an HFCheckpoint: its tensors (a tied checkpoint's redundant lm_head.weight left out)."""
        all_names = ckpt.names()
        tied = is_tied(ckpt.config)
        if not tied and LM_HEAD not in all_names and EMBED in all_names:
            raise FtjaxError(f"{ckpt.path}: config.json does not tie the embeddings (tie_word_embeddings "
                             f"{ckpt.config.get('tie_word_embeddings', 'absent')}) but there is no {LM_HEAD}; "
                             "transformers would start that head at random. If the model ties them, set "
                             '"tie_word_embeddings": true in config.json')
        names = tuple(n for n in all_names if not (tied and n == LM_HEAD))
        infos = {n: ckpt.info(n) for n in names}
        return cls(names, {n: tuple(i.shape) for n, i in infos.items()}, {n: i.dtype for n, i in infos.items()}, tied)

    @classmethod
    def of_tree(cls, flat: Mapping[str, Any]) -> Layout:
        """From a flat {name: array} parameter tree (a tree ties its embeddings when it has no lm_head.weight)."""
        return cls(tuple(flat), {n: tuple(x.shape) for n, x in flat.items()},
                   {n: np.dtype(x.dtype) for n, x in flat.items()}, LM_HEAD not in flat)

    @classmethod
    def of_model(cls, cfg: Any, dtype: Any = np.float32) -> Layout:
        """The tensors the model of ModelConfig `cfg` needs, from its own parameter tree (all of `dtype`)."""
        from ftjax.model import param_shapes

        shapes = param_shapes(cfg)
        return cls(tuple(shapes), shapes, {n: np.dtype(dtype) for n in shapes}, cfg.tie_word_embeddings)

    @property
    def lm_head(self) -> str:
        """The tensor that plays the output embedding: lm_head.weight, or the input embedding when tied."""
        return EMBED if self.tied else LM_HEAD

    def source_of(self, name: str, other: Layout) -> str:
        """The tensor of `other` that corresponds to this layout's `name` (an untied lm_head reads a tied model's
        embedding: the change of its output embedding)."""
        return other.lm_head if name == LM_HEAD else name

    def is_float(self, name: str) -> bool:
        return dtypes.is_float(self.dtypes[name])

    @property
    def float_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if self.is_float(n))

    @property
    def vocab_rows(self) -> int | None:
        return self.shapes[EMBED][0] if EMBED in self.shapes else None

    def problems(self, shapes: Mapping[str, Sequence[int]]) -> list[str]:
        """How a flat {name: shape} differs from this layout: missing, unexpected and misshapen tensors."""
        out = [f"missing {n}" for n in self.names if n not in shapes]
        out += [f"unexpected {n}" for n in shapes if n not in self.shapes]
        out += [f"{n} has shape {tuple(shapes[n])}, config says {self.shapes[n]}"
                for n in self.names if n in shapes and tuple(shapes[n]) != self.shapes[n]]
        return out

    def check(self, flat: Mapping[str, Any], *, source: str) -> None:
        """FtjaxError listing every problem unless `flat` ({name: array or info}) has exactly these tensors."""
        problems = self.problems({n: tuple(x.shape) for n, x in flat.items()})
        if problems:
            raise FtjaxError(f"{source}: tensors do not match config.json: {first_few(problems)}")


# --- sharding: one rule table from tensor names to PartitionSpecs; first match wins -------------------------------


def _shard_largest(shape: tuple[int, ...], n: int) -> PartitionSpec:
    """Shard the largest dimension that the fsdp axis divides; replicate if none does."""
    for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
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
