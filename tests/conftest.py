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


@pytest.fixture
def count_calls(monkeypatch):
    """count_calls(module, name) -> a Counter-like dict whose ["n"] counts calls of `module.name` from now on.

    Wrap a function that a jitted function calls while it is traced: its count is then the number of traces
    (compilations), measured from outside without hooks in library code or private JAX APIs."""
    def count(module, name: str) -> dict:
        calls = {"n": 0}
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls["n"] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
        return calls

    return count
