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
