"""Shared fixtures: the real datasets (MNIST, FashionMNIST, Cifar10, official formats), where present."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_answered():
    """The signal tests send SIGINT as a terminal's Ctrl-C would. A suite started as a shell
    script's background job (`pytest &`) inherits Ctrl-C ignored, which feedalign and the
    processes the tests start would keep: Python's usual handler is put back for the session."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


SHARED_DATA = Path(
    os.environ.get("FEEDALIGN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


@pytest.fixture
def shared_data() -> Path:
    """Folder with the real MNIST / FashionMNIST / Cifar10 files; skips where absent."""
    if not (SHARED_DATA / "MNIST").is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set FEEDALIGN_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture
def float64():
    """Every tensor of the test is float64 (formula checks); the default is restored after."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
