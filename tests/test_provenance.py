"""Provenance records name their inputs as given and as absolute paths, so a record read elsewhere still finds them."""

import json

from hf_models import make_hf_model

from ftjax.cli import main


def test_records_keep_given_paths_and_add_absolute_ones(tmp_path, monkeypatch, capsys):
    for seed, name in enumerate(("base", "ft", "target")):
        make_hf_model(tmp_path / name, "llama", seed=seed)
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    for argv in (["transfer", "--source-base", "base", "--source-ft", "ft", "--target-base", "target", "--out", "t",
                  "--quiet"], ["diff", "--base", "base", "--ft", "ft", "--out", "d", "--quiet"]):
        assert main(argv) == 0, capsys.readouterr().err
    transfer = json.loads((tmp_path / "t" / "ftjax_transfer.json").read_text())
    assert transfer["inputs"] == {"source_base": "base", "source_ft": "ft", "target_base": "target"}
    assert transfer["inputs_absolute"] == {role: str((tmp_path / p).resolve())
                                           for role, p in transfer["inputs"].items()}
    diff = json.loads((tmp_path / "d" / "ftjax_diff.json").read_text())
    assert diff["inputs"] == {"base": "base", "ft": "ft"}
    assert diff["inputs_absolute"] == {"base": str((tmp_path / "base").resolve()),
                                       "ft": str((tmp_path / "ft").resolve())}
    assert main(["stats", "--source-base", "base", "--source-ft", "ft", "--out", "s"]) == 0
    stats = json.loads((tmp_path / "s" / "stats.json").read_text())
    assert stats["models"] == {"source_base": "base", "source_ft": "ft"}
    assert stats["models_absolute"] == {"source_base": str((tmp_path / "base").resolve()),
                                        "source_ft": str((tmp_path / "ft").resolve())}
