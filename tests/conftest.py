"""Shared test setup, kept minimal.

* The repository root goes on sys.path, so plain ``pytest`` works from a checkout without
  ``pip install -e .``.
* ``single_thread``: run a test with one intra-op torch thread. CI shares 2 cores among many
  processes; with 2 torch threads each, small ops spend their time waiting on each other (a
  300-step digits MLP run measured 35x slower). The previous setting is restored afterwards.
"""
from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@contextlib.contextmanager
def _one_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def single_thread():
    with _one_intra_op_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_per_module():
    """``single_thread`` for a whole test module (``pytestmark = usefixtures(...)``)."""
    with _one_intra_op_thread():
        yield
