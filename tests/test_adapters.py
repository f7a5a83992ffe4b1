import numpy as np
import torch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from facemt import FacemtError
from facemt.data import age_to_group, combine, load_index, parse_jaffe_name, parse_utkface_name


@pytest.mark.parametrize(
    "age,strict,nearest",
    [(5, None, None), (18, None, None), (19, "young", "young"), (31, "young", "young"), (33, None, "young"),
     (35, None, "young"), (36, None, "middle"), (39, "middle", "middle"), (55, "middle", "middle"),
     (62, None, "middle"), (63, None, "old"), (69, "old", "old"), (80, "old", "old"), (95, None, "old")],
)
def test_age_policy(age, strict, nearest):
    assert age_to_group(age, "strict") == strict
    assert age_to_group(age, "nearest") == nearest


def test_utkface_names():
    labels = parse_utkface_name("48_1_2_20170109002813437.jpg.chip.jpg")
    assert labels["age"] == 48 and labels["age_group"] == "middle" and labels["gender"] == "female"
    assert parse_utkface_name("26_0_0_20170105162452859.jpg.chip.jpg")["gender"] == "male"
    for bad in ("61_1_20170109142408075.jpg.chip.jpg", "x_0_0_1.jpg", "48_2_0_1.jpg", "200_0_0_1.jpg"):
        with pytest.raises(FacemtError):
            parse_utkface_name(bad)


def test_jaffe_names():
    assert parse_jaffe_name("KA.AN1.39.tiff") == {"person": "jaffe:KA", "expression": "anger", "gender": "female"}
    assert parse_jaffe_name("NA.HA2.203.tiff")["person"] == "jaffe:NA"  # NA is a person, not missing
    with pytest.raises(FacemtError, match="surprise"):
        parse_jaffe_name("KA.SU1.36.tiff")
    with pytest.raises(FacemtError):
        parse_jaffe_name("KA_AN1.tiff")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text())
def test_adapters_raise_only_project_errors(name):
    for parse in (parse_utkface_name, parse_jaffe_name):
        try:
            parse(name)
        except FacemtError:
            pass


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (16, 16), 100).save(path)


def test_sources_are_detected_and_combined_with_masked_labels(tmp_path):
    for name in ("KA.AN1.39.tiff", "KA.HA1.40.tiff", "NA.SA1.41.tiff", "NA.SU1.42.tiff"):
        _img(tmp_path / "jaffe" / name)
    for name in ("25_0_0_2017.jpg.chip.jpg", "45_1_1_2017.jpg.chip.jpg", "34_1_1_2017.jpg.chip.jpg",
                 "3_0_0_2017.jpg.chip.jpg", "61_1_2017.jpg.chip.jpg"):
        _img(tmp_path / "utk" / name)
    jaffe = load_index(tmp_path / "jaffe")
    utk = load_index(f"utkface:{tmp_path / 'utk'}")
    assert list(jaffe.table["expression"]) == ["anger", "happiness", "sadness"]
    assert list(jaffe.table["person"]) == ["jaffe:KA", "jaffe:KA", "jaffe:NA"]
    assert len(jaffe.skipped) == 1 and "surprise" in jaffe.skipped[0]
    assert len(utk) == 3 and len(utk.skipped) == 2  # a child and a name missing a field
    assert list(utk.table["age_group"]) == ["young", None, "middle"]  # 34 is in a gap
    both = combine([jaffe, utk])
    assert both.summary()["sources"] == {"jaffe": 3, "utkface": 3}
    assert both.table["age_group"].notna().sum() == 2 and both.table["expression"].notna().sum() == 3
    with pytest.raises(FacemtError, match="unknown data adapter"):
        load_index(f"imdb:{tmp_path}")


def _ferplus(root, split, rows):
    folder = root / split
    folder.mkdir(parents=True)
    lines = []
    for i, votes in enumerate(rows):
        name = f"fer{i:07d}.png"
        Image.new("L", (48, 48), 40 + 10 * i).save(folder / name)
        lines.append(f'{name},"(0, 0, 48, 48)",' + ",".join(map(str, votes)))
    (folder / "label.csv").write_text("\n".join(lines) + "\n")
    return folder


# vote order: neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF
FER_ROWS = [
    (4, 0, 0, 1, 3, 2, 0, 0, 0, 0),   # neutral wins -> neutrality
    (0, 10, 0, 0, 0, 0, 0, 0, 0, 0),  # happiness
    (0, 0, 0, 0, 6, 4, 0, 0, 0, 0),   # anger, clear majority
    (0, 0, 0, 0, 0, 4, 3, 0, 3, 0),   # disgust, no clear majority
    (5, 5, 0, 0, 0, 0, 0, 0, 0, 0),   # tie -> masked
    (0, 0, 8, 0, 0, 0, 0, 2, 0, 0),   # surprise -> masked
    (0, 0, 0, 0, 0, 0, 0, 7, 3, 0),   # contempt -> masked
    (0, 0, 0, 0, 0, 0, 0, 0, 2, 8),   # not a face -> masked
    (1, 0, 0, 0, 0, 0, 9, 0, 0, 0),   # fear
]


def test_ferplus_votes_become_faces_labels(tmp_path):
    _ferplus(tmp_path, "FER2013Train", FER_ROWS)
    index = load_index(str(tmp_path))  # the layout is recognised; the root reads FER2013Train
    labels = dict(zip((p.rsplit("/", 1)[-1] for p in index.table["path"]), index.table["expression"]))
    assert labels == {"fer0000000.png": "neutrality", "fer0000001.png": "happiness", "fer0000002.png": "anger",
                      "fer0000003.png": "disgust", "fer0000008.png": "fear"}
    reasons = " ".join(index.skipped)
    assert len(index.skipped) == 4 and "tied" in reasons and "surprise" in reasons and "contempt" in reasons
    assert "NF" in reasons
    assert index.table["gender"].isna().all() and index.table["person"].nunique() == 5
    clear = load_index(f"ferplus-clear:{tmp_path / 'FER2013Train'}")
    assert sorted(p.rsplit("/", 1)[-1] for p in clear.table["path"]) == [
        "fer0000001.png", "fer0000002.png", "fer0000008.png"]  # more than half of the votes


def test_ferplus_bad_rows_and_folders_are_user_errors(tmp_path):
    folder = _ferplus(tmp_path, "FER2013Valid", FER_ROWS[:2])
    (folder / "label.csv").write_text("fer0000000.png,box,1,2\n")
    with pytest.raises(FacemtError, match="label.csv:1"):
        load_index(f"ferplus:{folder}")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FacemtError, match="not a FER\\+ folder"):
        load_index(f"ferplus:{tmp_path / 'nothing'}")


def test_ferplus_test_split_is_never_trained_on(tmp_path, capsys):
    from facemt.cli import main

    test = _ferplus(tmp_path, "FER2013Test", FER_ROWS)
    code = main(["fit", "--data", f"ferplus:{test}", "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--image-size", "32", "--device", "cpu", "--crop", "none"])
    assert code == 2 and "never trained on" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert len(load_index(f"ferplus:{test}")) == 5  # evaluating on it is fine


def test_ferplus_soft_keeps_the_crowd_votes_and_trains_on_them(tmp_path):
    from facemt.cli import main
    from facemt.data import soft_targets

    train = _ferplus(tmp_path, "FER2013Train", FER_ROWS * 3)
    soft = load_index(f"ferplus-soft:{train}")
    majority = load_index(f"ferplus:{train}")
    assert list(soft.table["expression"]) == list(majority.table["expression"])  # same rows, same labels
    dist = soft_targets(soft.table, ["expression", "gender"])
    assert set(dist) == {"expression"}  # only heads with votes
    first = dist["expression"][0]  # votes 4 neutral, 1 sadness, 3 anger, 2 disgust (contempt etc. not FACES)
    assert np.allclose(first, np.array([3, 2, 0, 0, 4, 1]) / 10)
    both = combine([soft, load_index(f"ferplus:{train}")])  # a source without votes: NaN rows
    assert np.isnan(soft_targets(both.table, ["expression"])["expression"][len(soft):]).all()
    assert main(["fit", "--data", f"ferplus-soft:{train}", "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--image-size", "32", "--device", "cpu", "--crop", "none", "--no-pretrained",
                 "--backbone", "resnet18", "--val-fraction", "0"]) == 0


def test_soft_targets_loss():
    from facemt.losses import MISSING, MultiTaskLoss

    torch.manual_seed(0)
    logits = torch.randn(4, 6, requires_grad=True)
    target = torch.tensor([0, 3, MISSING, 5])
    crit = MultiTaskLoss({"expression": 1.0}, label_smoothing=0.1)
    hard, _ = crit({"expression": logits}, {"expression": target})
    none = torch.full((4, 6), float("nan"))
    same, _ = crit({"expression": logits}, {"expression": target}, soft={"expression": none})
    torch.testing.assert_close(same, hard)  # no votes anywhere: the smoothed-label loss
    votes = none.clone()
    votes[1] = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.0, 0.5])
    soft, _ = crit({"expression": logits}, {"expression": target}, soft={"expression": votes})
    (grad,) = torch.autograd.grad(soft, logits)
    p = torch.softmax(logits[1], 0).detach()
    torch.testing.assert_close(grad[1], (p - votes[1]) / 3)  # row 1 pulled toward its vote distribution
    assert torch.all(grad[2] == 0)  # unlabelled row
