"""No silent surprises: every user mistake is one line and exit 2, nothing is overwritten or left half-written,
and reports say what really ran."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import facemt
from facemt import FacemtError
from facemt.cli import main
from facemt.data import load_sources
from facemt.evaluation import BASELINE, evaluation_notes
from facemt.images import as_rgb_image
from facemt.splits import validation_split
from tolerance import assert_same_predictions

from conftest import TINY_FIT

NO_GPU = not torch.cuda.is_available()


def _manifest(faces_dir, tmp_path, persons=None, twice=None):
    """A CSV manifest of the generated faces (only ``persons``), optionally one file listed a second time
    with other labels."""
    rows = []
    for f in sorted(faces_dir.glob("*.jpg")):
        person, age, gender, expression, _ = f.stem.split("_")
        if persons is None or person in persons:
            rows.append({"path": str(f), "person": person, "age_group": age, "gender": gender,
                         "expression": expression})
    if twice is not None:
        rows.append({**rows[0], **twice})
    path = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


# Each user mistake: the arguments (FACES = the generated set, RUN = a trained run, OUT = a fresh path,
# DIR = an existing folder, PHOTO = one image) and a word the one-line message must hold.
USER_ERRORS = [
    (["predict", "PHOTO", "--model", "RUN", "--batch-size", "0"], "batch size"),
    (["predict", "PHOTO", "--model", "RUN", "--out", "DIR"], "is a folder"),
    (["predict", "PHOTO", "--model", "RUN", "--out", "/proc/facemt-test.csv"], "cannot write there"),
    (["predict", "OUT/nope.jpg", "--model", "RUN"], "no such file or folder"),
    (["predict", "OUT/nope_dir/", "--model", "RUN"], "no such file or folder"),
    (["fit", "--data", "FACES", "--out", "OUT", "--dropout", "1.5"], "--dropout"),
    (["fit", "--data", "FACES", "--out", "OUT", "--label-smoothing", "2"], "--label-smoothing"),
    (["fit", "--data", "FACES", "--out", "OUT", "--device", "tpu"], "--device"),
    (["fit", "--data", "FACES", "--out", "OUT", "--refit", "--val-fraction", "0"], "--refit trains again"),
    (["fit", "--data", "FACES", "--out", "OUT", "--validation-groups", "0"], "--validation-groups must be between"),
    (["cv", "--data", "FACES", "--out", "OUT", "--validation-groups", "3", "--val-fraction", "0"],
     "--validation-groups above 1 holds out more persons"),
    (["fit", "--data", "FACES", "--data", "FACES", "--out", "OUT"], "give each source once"),
    (["fit", "--resume", "RUN", "--epochs", "3", "--data", "FACES", "--out", "OUT", "--image-size", "96"],
     "drop --data, --image-size, --epochs, --out"),
    (["cv", "--data", "FACES", "--out", "OUT", "--split", "random", "--folds", "100"], "only 72 images"),
    (["check-data", "--data", "FACES", "--data", "FACES"], "give each source once"),
    (["merge-predictions", "--out", "DIR"], "is a folder"),
    # folders that cannot be written are said before any work, not as a traceback after training
    (["fit", "--data", "FACES", "--out", "/proc/facemt-test/run", *TINY_FIT], "cannot write there"),
    (["cv", "--data", "FACES", "--out", "/proc/facemt-test", "--folds", "2", *TINY_FIT], "cannot write there"),
    (["evaluate", "--model", "RUN", "--data", "FACES", "--explain", "/proc/facemt-test"], "cannot write there"),
    (["explain", "PHOTO", "--model", "RUN", "--out", "/proc/facemt-test"], "cannot write there"),
    (["explain", "PHOTO", "--model", "RUN", "--out", "PHOTO"], "is a file"),
    (["synth", "/proc/facemt-test", "--persons", "2"], "cannot write there"),
    (["export", "--model", "RUN", "--out", "/proc/facemt-test.onnx"], "cannot write there"),
    (["export", "--model", "RUN", "--out", "DIR"], "is a folder"),
]
if NO_GPU:
    USER_ERRORS += [(["predict", "PHOTO", "--model", "RUN", "--device", "cuda"], "no CUDA GPU"),
                    (["fit", "--data", "FACES", "--out", "OUT", "--device", "cuda", *TINY_FIT[:-2]], "no CUDA GPU")]


@pytest.mark.parametrize("argv,match", USER_ERRORS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in USER_ERRORS])
def test_every_user_error_is_one_line_and_exit_2(argv, match, faces_dir, run_dir, tmp_path, capsys):
    photo = sorted(faces_dir.glob("*.jpg"))[0]
    folder = tmp_path / "dir.csv"
    folder.mkdir()
    subs = {"FACES": str(faces_dir), "RUN": str(run_dir), "OUT": str(tmp_path / "o"), "DIR": str(folder),
            "PHOTO": str(photo)}
    argv = [subs.get(a, a.replace("OUT", subs["OUT"])) for a in argv]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error:") and match in err and "\n" not in err, err
    assert "Traceback" not in err and not captured.out  # no table, no partial output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, no temporary file left


def test_a_disk_failure_no_check_foresaw_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "s" / "001_y_m_a_a.jpg"))

    monkeypatch.setattr("facemt.synth.generate", full)
    assert main(["synth", str(tmp_path / "s"), "--persons", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.splitlines()[-1] == f"error: {tmp_path / 's' / '001_y_m_a_a.jpg'}: No space left on device", err


def test_the_python_api_refuses_a_zero_batch(run_dir):
    with pytest.raises(FacemtError, match="batch size"):
        facemt.load(run_dir, device="cpu", batch_size=0)


def test_predict_never_replaces_a_file_without_overwrite(run_dir, faces_dir, tmp_path, capsys):
    photo = str(sorted(faces_dir.glob("*.jpg"))[0])
    keep = tmp_path / "keep.csv"
    keep.write_text("precious\n")
    assert main(["predict", photo, "--model", str(run_dir), "--out", str(keep)]) == 2
    assert "--overwrite" in capsys.readouterr().err and keep.read_text() == "precious\n"
    assert main(["predict", photo, "--model", str(run_dir), "--out", str(keep), "--overwrite"]) == 0
    assert keep.read_text().startswith("path,status")
    assert main(["merge-predictions", str(keep), "--out", str(keep)]) == 2  # merge follows the same rule
    assert keep.read_text().startswith("path,status")


def test_merge_refuses_parts_of_different_models_or_options(run_dir, faces_dir, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["predict", str(faces_dir), "--model", str(run_dir), "--shard", "1/2", "--out", str(out)]) == 0
    assert main(["predict", str(faces_dir), "--model", str(run_dir), "--shard", "2/2", "--out", str(out),
                 "--tta"]) == 0
    capsys.readouterr()
    assert main(["merge-predictions", "--out", str(out)]) == 2
    assert "different models or options (tta)" in capsys.readouterr().err and not out.exists()
    manifest = json.loads((tmp_path / "p.part-1-of-2.csv.json").read_text())
    assert manifest["options"]["weights_sha256"] == json.loads((run_dir / "config.json").read_text())["weights_sha256"]


def test_a_uint16_array_is_rescaled_like_a_16_bit_png(run_dir, faces_dir, tmp_path):
    eight = np.asarray(Image.open(sorted(faces_dir.glob("*.jpg"))[0]).convert("L"))
    sixteen = (eight.astype(np.uint16) * 257)  # the same picture at 16 bits
    Image.fromarray(sixteen).save(tmp_path / "16.png")
    lo, hi = int(eight.min()), int(eight.max())
    stretched = np.round((eight.astype(float) - lo) / (hi - lo) * 255)
    assert np.array_equal(np.asarray(as_rgb_image(sixteen))[..., 0], stretched)  # not clipped to white
    model = facemt.load(run_dir, device="cpu")
    from_array, from_file = model.predict([sixteen, tmp_path / "16.png"])
    assert_same_predictions([from_array], [dataclasses.replace(from_file, source=None)])
    with pytest.raises(FacemtError, match="not an image"):
        model.predict(np.zeros((8, 8), bool))


def test_one_file_with_two_labels_is_an_error(faces_dir, tmp_path, capsys):
    manifest = _manifest(faces_dir, tmp_path, twice={"expression": "sadness"})
    assert main(["check-data", "--data", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert "listed 2 times with different labels" in err and "expression" in err
    same = _manifest(faces_dir, tmp_path, twice={})  # the same row twice is no contradiction
    assert len(load_sources([str(same)])) == 73


def test_resume_reads_its_data_from_any_working_directory(faces_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(faces_dir.parent)
    run = tmp_path / "r"
    assert main(["fit", "--data", faces_dir.name, "--out", str(run), *TINY_FIT, "--epochs", "1"]) == 0
    sources = json.loads((run / "config.json").read_text())["sources"]
    assert sources == [str(faces_dir.resolve())]
    monkeypatch.chdir(tmp_path)  # where 'faces0' means nothing
    assert len(load_sources(sources)) == 72


@pytest.mark.parametrize("fraction,persons", [(0.1, 1), (0.2, 1), (0.4, 2), (0.5, 3), (0.6, 4), (0.99, 5)])
def test_val_fraction_is_honoured_to_the_nearest_person(faces_dir, fraction, persons):
    table = load_sources([str(faces_dir)]).table
    train, val = validation_split(table, fraction, seed=0)
    held = set(table["person"].iloc[val])
    assert len(held) == persons and not held & set(table["person"].iloc[train])
    assert len(train) + len(val) == len(table)


def test_fit_prints_the_split_it_used(faces_dir, tmp_path, capsys):
    assert main(["fit", "--data", str(faces_dir), "--out", str(tmp_path / "r"), *TINY_FIT, "--epochs", "1",
                 "--val-fraction", "0.4"]) == 0
    assert "validation: 24 images of 2 person(s) (33% held out; --val-fraction 0.4)" in capsys.readouterr().err


def test_cv_says_how_many_folds_ran_and_reports_an_honest_baseline(faces_dir, tmp_path, capsys):
    out = tmp_path / "cv"
    assert main(["cv", "--data", str(faces_dir), "--out", str(out), "--folds", "10", "--no-baselines",
                 "--no-fit-model", *TINY_FIT, "--epochs", "1", "--tasks", "gender,expression"]) == 0
    err = capsys.readouterr().err
    assert "6 folds, not 10" in err
    report = (out / "report.md").read_text()
    assert "6 subject folds (10 asked)" in report and "10 folds" not in report.replace("(10 asked)", "")
    # The base model frames at its own size: two framings of 72 images.
    assert "Images decoded: 144 (72 images, each once per framing (2 framings" in report
    assert BASELINE[1:] in report
    records = pd.read_csv(out / "results.csv")
    gender = records[(records["model"] == "multitask") & (records["head"] == "gender")]
    # 3 men and 3 women: always answering the whole set's majority class is right for half the persons;
    # the training fold's majority (always the held-out person's other gender) would score 0 %.
    assert gender["majority_accuracy"].mean() == pytest.approx(0.5)


def test_cv_applies_fits_two_class_rule_to_every_fold(faces_dir, tmp_path, capsys):
    manifest = _manifest(faces_dir, tmp_path, persons={"001", "002"})  # one man, one woman
    assert main(["cv", "--data", str(manifest), "--out", str(tmp_path / "cv"), "--no-baselines",
                 *TINY_FIT, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "a head needs at least two classes" in err and "fold 1" in err
    assert not (tmp_path / "cv").exists()


def test_cv_checks_fits_own_split_of_every_fold_before_training(faces_dir, tmp_path, capsys):
    # two men and two women, two folds: each fold trains on one man and one woman, and fit itself holds
    # one of those two out for validation, which leaves a single gender to train its named head on
    manifest = _manifest(faces_dir, tmp_path, persons={"001", "002", "003", "004"})
    argv = ["cv", "--data", str(manifest), "--out", str(tmp_path / "cv"), "--no-baselines", "--folds", "2",
            "--tasks", "gender", *TINY_FIT, "--epochs", "1"]
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "fold 1 fit: cannot train gender: its training images have only" in err and "--no-fit-model" in err
    assert "Traceback" not in err and not (tmp_path / "cv").exists()


def test_evaluate_says_which_heads_and_classes_it_cannot_score(faces_dir, tmp_path, capsys):
    run = tmp_path / "expr"
    assert main(["fit", "--data", str(faces_dir), "--out", str(run), "--tasks", "expression", *TINY_FIT,
                 "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(run), "--data", str(faces_dir), "--json"]) == 0
    captured = capsys.readouterr()
    notes = json.loads(captured.out)["notes"]
    assert notes[0] == "the data has age_group, gender labels, but the model has no such head: not scored"
    assert "this run was fit on" in notes[1]  # these are the run's own training images
    # and, where the run's step chose a person-relative classifier on its validation persons, a note that says so
    assert all("person-relative classifier" in n for n in notes[2:]) and len(notes) <= 3, notes
    assert "note: the data has age_group, gender labels" in captured.err
    table = load_sources([str(faces_dir)]).table
    config = {"class_counts": {"expression": [5, 0, 5, 5, 5, 5]}}
    assert evaluation_notes(config, ("expression",), table)[1:] == [
        "expression: the model saw no 'disgust' images in training; it can hardly get these 12 right"]
