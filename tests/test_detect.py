"""Face detection, crops, streaming folder prediction."""

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

import facemt
from facemt.cli import main
from facemt.detect import crop_face, default_detector
from facemt.synth import draw_face, make_person


@pytest.fixture(scope="module")
def portrait():
    # Person 2 of this seed (young, female) is a face the Haar cascade finds.
    rng = np.random.default_rng(0)
    make_person(1, "young", "male", rng)
    person = make_person(2, "young", "female", rng)
    return draw_face(person, "happiness", rng, (240, 300))


def test_detector_finds_the_face_with_a_plausible_box(portrait):
    faces = default_detector().detect(portrait)
    assert len(faces) == 1
    x, y, w, h = faces[0].box
    assert 60 <= x + w / 2 <= 180 and 60 <= y + h / 2 <= 200  # centred on the head
    assert 80 <= w <= 240


def test_two_faces_give_two_boxes_largest_first(portrait):
    canvas = Image.new("RGB", (600, 320), (90, 90, 90))
    canvas.paste(portrait, (10, 10))
    canvas.paste(portrait.resize((200, 250)), (340, 40))
    faces = default_detector().detect(canvas)
    assert len(faces) == 2
    assert faces[0].box[2] >= faces[1].box[2] and faces[0].box[0] < 300 < faces[1].box[0]


def test_crop_is_square_and_padded_at_the_border():
    image = Image.new("RGB", (100, 80), "red")
    crop = crop_face(image, (0, 0, 40, 30), margin=0.5)
    assert crop.size == (80, 80)
    assert crop.getpixel((0, 0)) == (255, 0, 0)


def test_blank_image_has_no_face():
    assert default_detector().detect(Image.new("RGB", (200, 200), "white")) == []


@pytest.fixture()
def photos(portrait, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    two = Image.new("RGB", (600, 320), (90, 90, 90))
    two.paste(portrait, (10, 10))
    two.paste(portrait.resize((200, 250)), (340, 40))
    two.save(folder / "two.jpg")
    portrait.save(folder / "one.jpg")
    Image.new("RGB", (200, 200), "white").save(folder / "blank.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    return folder


def test_predict_gives_one_result_per_face_with_boxes(run_dir, photos, capsys):
    assert main(["predict", str(run_dir), str(photos / "two.jpg"), "--json", "--device", "cpu"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["face"] for r in results] == [0, 1]
    assert all(len(r["box"]) == 4 and r["status"] == "ok" and "expression" in r for r in results)
    assert main(["predict", str(run_dir), str(photos / "two.jpg"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "face 0" in out and "face 1" in out


def test_no_face_is_reported_and_fallback_or_no_detect_predicts(run_dir, photos, capsys):
    blank = str(photos / "blank.png")
    assert main(["predict", str(run_dir), blank, "--json", "--device", "cpu"]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert r["status"] == "no_face" and "expression" not in r
    for flag in ("--fallback", "--no-detect"):
        assert main(["predict", str(run_dir), blank, "--json", "--device", "cpu", flag]) == 0
        (r,) = json.loads(capsys.readouterr().out)
        assert r["status"] == "ok" and "expression" in r and r.get("box") is None


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_streamed_output_is_complete_and_well_formed(run_dir, photos, tmp_path, suffix, capsys):
    for i in range(25):  # several batches, with unreadable files among them
        target = photos / f"copy{i:02d}.jpg"
        target.write_bytes((photos / ("broken.jpg" if i % 7 == 3 else "one.jpg")).read_bytes())
    out = tmp_path / f"preds{suffix}"
    code = main(["predict", str(run_dir), str(photos), "--out", str(out), "--batch-size", "4", "--device", "cpu"])
    assert code == 1  # some files are unreadable
    err = capsys.readouterr().err
    assert "written to" in err and "unreadable" in err
    text = out.read_text()
    rows = list(csv.DictReader(io.StringIO(text))) if suffix == ".csv" else [json.loads(l) for l in text.splitlines()]
    per_file = {}
    for r in rows:
        per_file.setdefault(r["path"].rsplit("/", 1)[-1], []).append(r)
    assert len(per_file) == 29  # every input file appears
    assert len(per_file["two.jpg"]) == 2
    assert [r["status"] for r in per_file["blank.png"]] == ["no_face"]
    assert sum(1 for rs in per_file.values() if rs[0]["status"] == "error") == 5
    assert all(rs[0]["status"] == "ok" for name, rs in per_file.items() if name.startswith("copy") and int(name[4:6]) % 7 != 3)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_bad_out_suffix_is_a_user_error(run_dir, photos, tmp_path, capsys):
    assert main(["predict", str(run_dir), str(photos), "--out", str(tmp_path / "x.txt")]) == 2
    assert "use a .csv or .jsonl" in capsys.readouterr().err


def test_fit_detect_crops_before_caching(faces_dir, portrait, tmp_path, capsys):
    data = tmp_path / "portraits"
    data.mkdir()
    rng = np.random.default_rng(3)
    for pid, (age, code) in enumerate([("young", "y"), ("old", "o")], start=1):
        for sex, g in (("male", "m"), ("female", "f")):
            person = make_person(pid, age, sex, rng)
            for e, expr in zip("ah", ("anger", "happiness")):
                pid_code = pid * 10 + (1 if g == "f" else 0)
                draw_face(person, expr, rng, (120, 150)).save(data / f"{pid_code:03d}_{code}_{g}_{e}_a.jpg")
    run = tmp_path / "run"
    assert main(["fit", "--data", str(data), "--out", str(run), "--detect", "--epochs", "1", "--image-size", "32",
                 "--device", "cpu", "--val-fraction", "0"]) == 0
    pre = facemt.load(run, device="cpu").preprocess
    assert pre.detect and pre.crop_margin == 0.4
