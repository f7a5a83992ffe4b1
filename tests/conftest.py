"""Shared fixtures: a tiny generated FACES set and one tiny trained run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from facemt.cli import main
from facemt.synth import generate

# Under pytest-xdist (README's test command runs one worker per core) each worker computes with its share of
# the cores, and so do the processes its tests start: workers that each took every core would slow each
# other down. Results of different thread counts are compared within a tolerance, never byte for byte.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)

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
