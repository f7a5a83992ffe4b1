"""Shared fixtures: a tiny generated FACES set and one tiny trained run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from facemt.cli import main
from facemt.synth import generate

TINY_FIT = ["--epochs", "2", "--image-size", "32", "--batch-size", "16", "--augment", "light", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _same_thread_count():
    """A test that changes PyTorch's thread count (a benchmark's main() does) must not change the
    arithmetic of the tests after it: results of different thread counts differ in the last bits."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def faces_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faces")
    generate(out, persons=6, size=(48, 60), seed=1)
    return out


@pytest.fixture(scope="session")
def run_dir(faces_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "demo"
    assert main(["fit", "--data", str(faces_dir), "--out", str(run), *TINY_FIT]) == 0
    return run
