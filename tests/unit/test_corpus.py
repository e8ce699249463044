"""The stdlib character corpus: deterministic, fixed vocabulary and split, clear refusal (issue 17)."""
import os

import pytest

from gradwire.data.corpus import (
    STDLIB_FILES,
    VOCAB,
    CorpusUnavailable,
    build_corpus,
    build_text,
    encode,
    eval_windows,
    normalise,
)


def _tree(tmp_path, files):
    for name, data in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return str(tmp_path)


def test_known_text_and_normalisation(tmp_path):
    root = _tree(tmp_path, {"a.py": b"x = 1\r\n\tif x:\n", "pkg/b.py": "s = 'caf\u00e9'\n".encode()})
    text = build_text(root, ("a.py", "pkg/b.py"))
    assert text == "# file: a.py\nx = 1\n    if x:\n\n# file: pkg/b.py\ns = 'caf?'\n"
    assert set(text) <= set(VOCAB) and len(VOCAB) == 96
    assert normalise("\u00e9\t\r") == "?    \n"
    assert encode("\n ~").tolist() == [0, 1, 95]


def test_deterministic_split(tmp_path):
    root = _tree(tmp_path, {f"m{i}.py": (f"def f{i}(x):\n    return x * {i}\n" * 400).encode() for i in range(3)})
    files = ("m0.py", "m1.py", "m2.py")
    a, b = build_corpus(root, files), build_corpus(root, files)
    assert a.sha256 == b.sha256 and a.train.equal(b.train) and a.val.equal(b.val)
    n = a.train.numel() + a.val.numel()
    assert a.train.numel() == round(0.9 * n)
    assert a.val.equal(encode(build_text(root, files))[a.train.numel():])  # the tail, not a shuffle
    with pytest.raises(ValueError):
        build_corpus(root, files, val_fraction=1.0)


def test_refuses_missing_files_clearly(tmp_path):
    root = _tree(tmp_path, {"argparse.py": b"pass\n"})
    with pytest.raises(CorpusUnavailable) as e:
        build_corpus(root)
    msg = str(e.value)
    assert str(tmp_path) in msg and "ast.py" in msg and f"{len(STDLIB_FILES) - 1} of {len(STDLIB_FILES)}" in msg
    assert "--data FILE" in msg and "Nothing is downloaded" in msg
    with pytest.raises(CorpusUnavailable, match="only"):  # present but too small
        build_corpus(root, ("argparse.py",))


def test_this_python_builds_it():
    try:
        c = build_corpus()
    except CorpusUnavailable as e:  # a stripped interpreter: the refusal is the behaviour under test above
        pytest.skip(str(e))
    assert c.train.numel() > 500_000 and c.val.numel() > 50_000
    assert int(c.train.max()) < len(VOCAB) and os.path.isdir(c.root)


def test_eval_windows_fixed():
    import torch

    t = torch.arange(100)
    x, y = eval_windows(t, 8, max_windows=4)
    assert x.shape == (4, 8) and y.equal(x + 1)
    assert x[:, 0].tolist() == [0, 24, 48, 72]  # 12 windows fit, every 3rd is taken
