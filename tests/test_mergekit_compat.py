"""The comparison of benchmarks/mergekit_compat.py without mergekit: every config there that has a float64 reference
of mergekit's semantics (mergekit's own example configs and one config per method), run by ftjax on the same tiny
models in both dtypes, is within ftjax's stated precision of that reference: float32 outputs within 2^-23 of the
tensor's largest value (one float32 rounding of values up to it), 16-bit outputs within one unit in the last place."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mergekit_compat as mc  # noqa: E402

from ftjax.merge import merge  # noqa: E402

CONFIGS = {**mc.EXAMPLES, **mc.OTHERS}
BOUND = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return mc.make_models(tmp_path_factory.mktemp("compat"))


@pytest.mark.parametrize("label", sorted(mc.REFERENCES))
def test_ftjax_is_within_its_precision_of_the_float64_reference_of_mergekits_semantics(models, tmp_path, label):
    cfg0 = CONFIGS[label]
    for dtype in (cfg0.get("dtype", "bfloat16"), "float32"):
        cfg = mc._replace(copy.deepcopy({**cfg0, "dtype": dtype}), models)
        out = tmp_path / dtype
        (tmp_path / f"{dtype}.yml").write_text(json.dumps(cfg))
        merge(tmp_path / f"{dtype}.yml", out, progress=False)
        _, rel = mc.off_reference(label, models, out)
        assert rel <= BOUND[dtype], f"{label} {dtype}: {rel:.2e} from float64 (bound {BOUND[dtype]:.1e})"
        assert np.isfinite(rel)
