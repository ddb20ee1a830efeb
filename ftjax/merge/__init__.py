"""Merging models: the methods users know from mergekit, run from its YAML configs (`merge`, `ftjax merge`) or on
pytrees in memory (`merge_params`), exact (float32 error-free arithmetic, one rounding), streaming in bounded memory,
with random masks that depend only on (seed, model, tensor, element).

    methods.py   the methods, their parameters and defaults        config.py   the YAML schema, parameter values
    kernels.py   the per-tensor arithmetic                         passes.py   statistics passes (top-k, L1, Gram)
    plan.py      per output tensor: inputs, values, passes, kernel run.py      streaming and in-memory execution
"""

from ftjax.merge.config import MergeConfig, load
from ftjax.merge.methods import METHODS
from ftjax.merge.run import merge, merge_params

__all__ = ["METHODS", "MergeConfig", "load", "merge", "merge_params"]
