"""Data-parallel training under torchrun (gloo, 2 CPU processes, generated faces)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from facemt.checkpoint import WEIGHTS, load_checkpoint
from facemt.cli import main
from facemt.shards import take_shard

# GroupNorm backbone: per-sample normalisation, so splitting a batch over two
# processes changes nothing but the order of float sums (BatchNorm would see
# half batches: the one documented source of difference with the default backbone).
EXACT = ["--image-size", "32", "--batch-size", "8", "--augment", "none", "--device", "cpu", "--crop", "none",
         "--backbone", "test_efficientnet_gn", "--no-pretrained", "--dropout", "0"]


def _torchrun(args: list[str], nproc: int = 2, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc-per-node={nproc}", "-m", "facemt", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_shard_partitions_exactly():
    items = list(range(23))
    parts = [take_shard(items, r + 1, 4) for r in range(4)]  # process r takes shard r + 1
    assert sorted(i for p in parts for i in p) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_two_processes_train_the_same_weights_as_one(faces_dir, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(["fit", "--data", str(faces_dir), "--out", str(single), "--epochs", "1", *EXACT]) == 0
    proc = _torchrun(["fit", "--data", str(faces_dir), "--out", str(multi), "--epochs", "1", *EXACT])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("best epoch") == 1  # rank 0 alone reports
    model, _, config = load_checkpoint(multi)  # one loadable run
    assert config["best_epoch"] == 1
    a, b = load_file(str(single / WEIGHTS)), load_file(str(multi / WEIGHTS))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    h1, h2 = pd.read_csv(single / "history.csv"), pd.read_csv(multi / "history.csv")
    pd.testing.assert_frame_equal(h1, h2, rtol=1e-4)  # all-reduced metrics = one process's metrics
    assert not list(multi.glob("*.tmp")) and not (multi / "resume.json").exists()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in env:
        if entry.startswith(b"RANK="):
            return int(entry[5:])
    return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker processes through /proc")
def test_sigterm_on_one_rank_stops_all_and_resumes_with_another_process_count(faces_dir, tmp_path):
    run = tmp_path / "run"
    proc = _torchrun(["fit", "--data", str(faces_dir), "--out", str(run), "--epochs", "40", *EXACT])
    deadline = time.time() + 180
    while not (run / "history.csv").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    workers = {_rank_of(c): c for c in _children(proc.pid)}
    os.kill(workers[1], signal.SIGTERM)  # only rank 1 is asked to stop
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0  # torchrun reports its workers' interrupted exit
    assert "Resume with: facemt fit --resume" in err
    state = (run / "resume.json")
    assert state.exists() and (run / "resume.safetensors").exists()
    interrupted = pd.read_csv(run / "history.csv")
    assert 1 <= len(interrupted) < 40

    # Continue with one process instead of two: the history goes on without a gap.
    assert main(["fit", "--resume", str(run)]) == 0
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == list(range(1, 41))
    pd.testing.assert_frame_equal(history.iloc[: len(interrupted)], interrupted)
    assert not state.exists()
    load_checkpoint(run)


def test_each_process_gets_a_disjoint_share_of_every_global_batch():
    from types import SimpleNamespace

    from facemt.config import TrainConfig
    from facemt.distributed import World
    from facemt.engine import epoch_loader

    dataset = type("Rows", (), {"__len__": lambda self: 33, "epoch": 0})()
    config = TrainConfig(batch_size=8, seed=3)

    def batches(rank: int, size: int, skip: int = 0) -> list[list[int]]:
        setup = SimpleNamespace(train_set=dataset, config=config, sample_weights=None, world=World(rank, size))
        return list(epoch_loader(setup, 2, skip).batch_sampler)

    whole = batches(0, 1)
    assert sorted(i for b in whole for i in b) == list(range(33))
    halves = [batches(r, 2) for r in range(2)]
    assert len(halves[0]) == len(halves[1]) == len(whole) - 1  # 33 = 4 x 8 + 1: a last batch of one image cannot be split in two
    assert len(batches(0, 3)) == len(whole) - 1 and len(batches(0, 1, skip=0)) == len(whole)
    for g, (a, b) in enumerate(zip(*halves)):
        assert not set(a) & set(b) and sorted(a + b) == sorted(whole[g])
    assert batches(1, 2, skip=3) == halves[1][3:]  # a resumed epoch continues the same order


def test_sharded_loss_averages_to_the_global_batch_gradient():
    from facemt.losses import MISSING, MultiTaskLoss

    torch.manual_seed(0)
    logits = torch.randn(10, 6, requires_grad=True)
    target = torch.tensor([0, 1, MISSING, 3, 4, MISSING, MISSING, MISSING, 2, 5])  # uneven labels per shard
    crit = MultiTaskLoss({"expression": 1.0}, label_smoothing=0.1)
    full, _ = crit({"expression": logits}, {"expression": target})
    (expected,) = torch.autograd.grad(full, logits)
    grads = torch.zeros_like(logits)
    counts = {"expression": int((target != MISSING).sum())}
    for part in (slice(0, 5), slice(5, 10)):  # what two processes compute; DDP averages their gradients
        loss, _ = crit({"expression": logits[part]}, {"expression": target[part]}, counts, 2)
        grads += torch.autograd.grad(loss, logits)[0] / 2
    torch.testing.assert_close(grads, expected)


def test_a_single_process_run_resumes_under_torchrun(faces_dir, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "facemt", "fit", "--data", str(faces_dir), "--out", str(run),
                             "--epochs", "30", *EXACT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (run / "history.csv").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    done = _torchrun(["fit", "--resume", str(run)])
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-3000:]
    assert err.count("resuming") == 1  # one process speaks
    assert list(pd.read_csv(run / "history.csv")["epoch"]) == list(range(1, 31))
    assert not (run / "resume.json").exists()
