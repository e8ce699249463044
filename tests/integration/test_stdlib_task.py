"""The main job's second task: --data stdlib trains on the stdlib corpus and reports the held-out
loss, and refuses clearly where the sources are missing (issue 17)."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train_module():
    spec = importlib.util.spec_from_file_location("gw_train_stdlib", os.path.join(ROOT, "launch", "train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_refuses_without_the_sources(tmp_path, monkeypatch, capsys):
    import gradwire.data.corpus as corpus

    monkeypatch.setattr(corpus, "stdlib_dir", lambda: str(tmp_path))
    rc = _train_module().main(["--config", os.path.join(ROOT, "configs", "baseline.json"), "--data", "stdlib",
                               "--steps", "1", "--no-progress", "--report-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "--data stdlib" in err and str(tmp_path) in err and "Nothing is downloaded" in err
    assert not (tmp_path / "r").exists()


def test_trains_and_reports_validation_loss(tmp_path, single_thread):
    from gradwire.data.corpus import CorpusUnavailable, build_text

    try:
        build_text()
    except CorpusUnavailable as e:
        pytest.skip(str(e))
    out = tmp_path / "r"
    rc = _train_module().main(["--config", os.path.join(ROOT, "configs", "fp6.json"), "--data", "stdlib",
                               "--steps", "3", "--no-progress", "--report-dir", str(out)])
    rep = json.loads((out / "report.json").read_text())
    assert rc == 0 and rep["data"].startswith("stdlib-py") and rep["model"]["vocab"] == 96
    assert 3.0 < rep["val_loss"] < 5.0  # near ln(96) = 4.56 after 3 steps
