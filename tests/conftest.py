"""Test set-up: 8 fake CPU devices (sharding tests), full float32 matmul precision, and tiny HF model builders."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """One `ftjax demo --tiny` output shared by the demo and notebook tests (it takes most of a minute)."""
    from ftjax.cli import main

    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--tiny", "--out", str(out)]) == 0
    return out
