"""benchmarks/device_check.py, the one prepared accelerator check, runs end to end at --smoke sizes on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_smoke(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = tmp_path / "dc.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--smoke", "--out", str(out),
                           "--dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    checks = ["hbm", "matmul", "copies", "attention", "disk", "transfer", "load", "scan_forward", "train_step"]
    assert set(checks) <= results.keys()
    assert results["meta"]["smoke"] and results["meta"]["jax"]
    assert results["hbm"]["TB_per_s"] > 0 and results["matmul"]["TFLOP_per_s"] > 0
    assert results["copies"]["h2d_pinned_GB_per_s"] > 0  # CPU offers pinned_host too
    assert results["attention"]["ftjax_bf16_implementation"] == "xla"
    assert results["transfer"]["api_equals_kernel"]
    assert results["load"]["bytes"] > 0 and "ratio_to_bound" in results["load"]
    assert results["scan_forward"]["tokens_per_s"] > 0
    assert results["train_step"]["remat_True"]["tokens_per_s"] > 0
    assert list(tmp_path.iterdir()) == [out]  # scratch files removed
