"""A character-level text corpus built at run time from the Python standard library's own source.

Why: the embedded Markov language (``models.synthetic``) is the main job's only other task, and a
codec that is harmless there may not be on real text. Every CPython install carries its stdlib as
``.py`` source, so this corpus needs no download. It is built deterministically:

* a fixed, sorted list of modules (``STDLIB_FILES``) that every CPython 3.9-3.13 ships as plain
  files (no module that became a package in that range: pathlib, zipfile, ...);
* each file decoded as UTF-8, line ends normalised to ``\\n``, tabs expanded to 4 spaces, and every
  character outside ``VOCAB`` (printable ASCII + newline) replaced by ``?``: a vocabulary fixed by
  the code, not by the files, so every machine's model has the same shape;
* files joined in list order, each preceded by a ``# file: <name>`` line;
* a fixed split: the first ``1 - val_fraction`` of the characters train, the rest validate (whole
  files at the end of the list land in validation, so the split is not a shuffle of overlapping
  windows of the same text).

The text differs between Python versions (the stdlib evolves), so ``Corpus.sha256`` and
``Corpus.python`` are recorded with every result; on one install the bytes are always the same.
A machine whose Python has no stdlib source (some minimal images strip it to .pyc) gets a
``CorpusUnavailable`` naming the directory and the missing files: nothing is downloaded instead.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass

import torch

# printable ASCII (space .. ~) and newline: 96 symbols, index = position in this string
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
_INDEX = {c: i for i, c in enumerate(VOCAB)}
UNKNOWN = "?"

# Plain-file modules of every CPython 3.9-3.13 (about 1.5 MB of source together). Order matters:
# the last files make up the validation split.
STDLIB_FILES = (
    "argparse.py", "ast.py", "calendar.py", "configparser.py", "contextlib.py", "csv.py",
    "dataclasses.py", "difflib.py", "enum.py", "fractions.py", "functools.py", "gettext.py",
    "heapq.py", "inspect.py", "ipaddress.py", "logging/__init__.py", "pprint.py", "random.py",
    "shutil.py", "statistics.py", "string.py", "subprocess.py", "tarfile.py", "textwrap.py",
    "threading.py", "tokenize.py", "typing.py", "uuid.py", "weakref.py",
)


class CorpusUnavailable(RuntimeError):
    """The files the corpus is built from are not on this machine."""


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # int64 token ids
    val: torch.Tensor
    vocab: str
    sha256: str  # of the whole normalised text (UTF-8)
    root: str
    files: tuple[str, ...]
    python: str

    @property
    def name(self) -> str:
        return f"stdlib-py{self.python}({self.sha256[:12]})"


def stdlib_dir() -> str:
    """Where this interpreter's pure-Python standard library lives."""
    return sysconfig.get_paths()["stdlib"]


def normalise(text: str) -> str:
    """Line ends to ``\\n``, tabs to 4 spaces, characters outside ``VOCAB`` to ``?``."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    return "".join(c if c in _INDEX else UNKNOWN for c in text)


def encode(text: str) -> torch.Tensor:
    """Token ids of normalised text (``VOCAB`` positions)."""
    return torch.tensor([_INDEX[c] for c in text], dtype=torch.long)


def build_text(root: str | None = None, files: tuple[str, ...] = STDLIB_FILES) -> str:
    """The normalised corpus text; ``CorpusUnavailable`` if any of ``files`` is missing under
    ``root`` (default: this interpreter's stdlib)."""
    root = stdlib_dir() if root is None else root
    missing = [f for f in files if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise CorpusUnavailable(
            f"the stdlib text corpus is built from Python source files that this machine lacks: "
            f"{len(missing)} of {len(files)} missing under {root!r} (e.g. {', '.join(missing[:3])}). "
            f"Some minimal Python images ship the standard library as .pyc only; install the "
            f"interpreter's full standard library (e.g. the distribution's python3 stdlib package), "
            f"or train on your own text with --data FILE. Nothing is downloaded.")
    parts = []
    for f in files:
        with open(os.path.join(root, f), "rb") as fh:
            raw = fh.read()
        # errors="replace": a stray non-UTF-8 byte becomes U+FFFD, which normalise maps to '?'
        parts.append(f"# file: {f}\n" + raw.decode("utf-8", errors="replace"))
    return normalise("\n".join(parts))


def build_corpus(root: str | None = None, files: tuple[str, ...] = STDLIB_FILES,
                 val_fraction: float = 0.1) -> Corpus:
    """The tokenised corpus with its fixed train/validation split (see the module docstring)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    text = build_text(root, files)
    if len(text) < 10_000:
        raise CorpusUnavailable(f"the stdlib corpus under {root!r} has only {len(text)} characters; need >= 10000")
    tokens = encode(text)
    cut = int(round(len(text) * (1.0 - val_fraction)))
    return Corpus(train=tokens[:cut], val=tokens[cut:], vocab=VOCAB,
                  sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
                  root=stdlib_dir() if root is None else root, files=tuple(files),
                  python=platform.python_version())


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed evaluation batches: up to ``max_windows`` non-overlapping windows of ``seq_len + 1``
    tokens, evenly spaced over ``tokens`` (no randomness: every run scores the same text)."""
    n = (tokens.numel() - 1) // seq_len
    if n < 1:
        raise ValueError(f"need more than {seq_len} tokens to evaluate, got {tokens.numel()}")
    k = min(n, max_windows)
    starts = (torch.arange(k) * (n // k)) * seq_len
    idx = starts[:, None] + torch.arange(seq_len + 1)
    w = tokens[idx]
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()
