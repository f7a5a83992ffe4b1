"""Sharded folder prediction and the merge that checks every input appears once."""

from __future__ import annotations

import json
import shutil

import pytest

from facemt import FacemtError
from facemt.cli import main
from facemt.shards import merge_parts, parse_shard, part_path, take_shard
from tolerance import assert_same_csv


def test_shards_partition_every_file_exactly_once():
    files = [f"f{i:03d}.jpg" for i in range(101)]
    for n in (1, 2, 3, 7, 101, 150):
        parts = [take_shard(files, k, n) for k in range(1, n + 1)]
        assert sorted(f for p in parts for f in p) == files
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parse_shard("2/4") == (2, 4)
    for bad in ("0/4", "5/4", "2", "a/b", "-1/3"):
        with pytest.raises(FacemtError, match="K/N"):
            parse_shard(bad)


@pytest.fixture(scope="module")
def sharded(run_dir, faces_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    whole = folder / "whole.csv"
    assert main(["predict", str(faces_dir), "--model", str(run_dir), "--out", str(whole)]) == 0
    for k in (1, 2, 3):
        assert main(["predict", str(faces_dir), "--model", str(run_dir), "--shard", f"{k}/3",
                     "--out", str(folder / "preds.csv")]) == 0
    return folder, whole


def test_merged_shards_equal_one_whole_prediction(sharded):
    folder, whole = sharded
    assert not (folder / "preds.csv").exists()  # parts only
    assert main(["merge-predictions", "--out", str(folder / "preds.csv")]) == 0
    # One batch of 24 per shard against batches of 32, 32 and 8: kernels may round differently for other batch
    # sizes, so rows, order and labels are exact and probabilities equal within the promised tolerance.
    assert_same_csv((folder / "preds.csv").read_text(), whole.read_text())
    manifest = json.loads((folder / "preds.part-2-of-3.csv.json").read_text())
    assert manifest["shard"] == 2 and manifest["shards"] == 3 and manifest["total_files"] == 72


def _copy_parts(folder, to):
    to.mkdir()
    for p in folder.glob("preds.part-*"):
        shutil.copy(p, to / p.name)
    return [to / f"preds.part-{k}-of-3.csv" for k in (1, 2, 3)]


def test_merge_refuses_gaps_and_overlaps(sharded, tmp_path):
    folder, _ = sharded
    one, two, three = _copy_parts(folder, tmp_path / "parts")
    out = tmp_path / "merged.csv"
    with pytest.raises(FacemtError, match="2/3 missing"):
        merge_parts([one, three], out)
    with pytest.raises(FacemtError, match="given twice"):
        merge_parts([one, two, three, one], out)
    lines = two.read_text().splitlines(keepends=True)
    two.write_text("".join(lines[:-1]))  # a truncated part
    with pytest.raises(FacemtError, match="no row for 1"):
        merge_parts([one, two, three], out)
    two.write_text("".join(lines + lines[-1:]))  # a row for a file of another shard
    three.write_text(three.read_text() + lines[1])
    with pytest.raises(FacemtError, match="not an input of shard 3/3"):
        merge_parts([one, two, three], out)
    assert not out.exists()
    # A part of another folder's prediction.
    manifest = json.loads((tmp_path / "parts" / "preds.part-1-of-3.csv.json").read_text())
    manifest["files_sha256"] = "0" * 64
    (tmp_path / "parts" / "preds.part-1-of-3.csv.json").write_text(json.dumps(manifest))
    assert main(["merge-predictions", str(one), str(two), str(three), "--out", str(out)]) == 2
    assert not out.exists()


def test_an_unfinished_part_is_never_merged(sharded, tmp_path):
    folder, _ = sharded
    one, two, three = _copy_parts(folder, tmp_path / "parts")
    (tmp_path / "parts" / "preds.part-3-of-3.csv.json").unlink()
    assert main(["merge-predictions", "--out", str(tmp_path / "parts" / "preds.csv")]) == 2
    with pytest.raises(FacemtError, match="did not finish"):
        merge_parts([one, two, three], tmp_path / "m.csv")


def test_predict_under_torchrun_takes_its_rank_s_shard(run_dir, faces_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert main(["predict", str(faces_dir), "--model", str(run_dir), "--out", str(tmp_path / "p.jsonl")]) == 0
    part = part_path(tmp_path / "p.jsonl", 3, 4)
    assert len(part.read_text().splitlines()) == 18  # 72 files / 4
    assert main(["predict", str(faces_dir), "--model", str(run_dir)]) == 2  # a shard needs --out
