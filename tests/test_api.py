"""The curated public API resolves: every advertised name imports, and `ftjax.transfer` stays the module."""

import types

import ftjax


def test_every_public_name_resolves():
    for name in ftjax.__all__:
        assert getattr(ftjax, name) is not None, name
    assert isinstance(ftjax.transfer, types.ModuleType) and callable(ftjax.transfer.transfer)
    assert callable(ftjax.diff) and callable(ftjax.apply) and callable(ftjax.load_params)


def test_version_is_a_string():
    assert isinstance(ftjax.__version__, str) and ftjax.__version__.count(".") == 2
