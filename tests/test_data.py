import itertools

import numpy as np
import pytest
from PIL import Image

from facemt import FacemtError
from facemt.data import encode_targets, index_folder, load_index, parse_faces_name, read_manifest
from facemt.tasks import TASKS


@pytest.mark.parametrize(
    "age,gender,expr,pset",
    list(itertools.product("ymo", "mf", "adfhns", "ab")),
)
def test_parse_every_faces_code(age, gender, expr, pset):
    labels = parse_faces_name(f"004_{age}_{gender}_{expr}_{pset}.jpg")
    assert labels["person"] == "004"
    assert labels["age_group"] == TASKS["age_group"].classes["ymo".index(age)]
    assert labels["gender"] == TASKS["gender"].classes["mf".index(gender)]
    assert labels["expression"] == TASKS["expression"].classes["adfhns".index(expr)]
    assert labels["set"] == pset


def test_parse_is_case_insensitive():
    assert parse_faces_name("017_O_F_H_B.JPEG")["expression"] == "happiness"


@pytest.mark.parametrize(
    "name", ["004_x_m_a_a.jpg", "004_o_m_a.jpg", "abc_o_m_a_a.jpg", "004_o_m_a_c.jpg", "", "004_o_m_z_a.jpg", "004_o_m_a_a_extra.jpg"]
)
def test_malformed_names_raise_project_error(name):
    with pytest.raises(FacemtError, match="FACES"):
        parse_faces_name(name)


def _img(path, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 80, 60)).save(path)


def test_index_folder_recursive_any_extension_reports_skipped(tmp_path):
    _img(tmp_path / "001_y_m_a_a.jpg")
    _img(tmp_path / "sub" / "002_o_f_h_b.PNG")
    _img(tmp_path / "holiday.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    index = index_folder(tmp_path)
    assert len(index) == 2
    assert list(index.table["person"]) == ["001", "002"]
    assert index.table.loc[1, "age_group"] == "old"
    assert len(index.skipped) == 1 and "holiday.jpg" in index.skipped[0]
    assert index.summary()["skipped"] == 1


def test_index_folder_errors(tmp_path):
    with pytest.raises(FacemtError, match="no such folder"):
        index_folder(tmp_path / "missing")
    _img(tmp_path / "x.jpg")
    with pytest.raises(FacemtError, match="no FACES-named images"):
        index_folder(tmp_path)


def test_manifest_with_missing_labels_and_codes(tmp_path):
    _img(tmp_path / "a.jpg")
    _img(tmp_path / "b.jpg")
    _img(tmp_path / "c.jpg")
    (tmp_path / "m.csv").write_text(
        "path,expression,gender,person\n"
        "a.jpg,happiness,,NA\n"
        "b.jpg,s,f,KA\n"
        "c.jpg,,m,\n"
    )
    index = load_index(tmp_path / "m.csv")
    t = index.table
    assert list(t["expression"]) == ["happiness", "sadness", None]
    assert list(t["gender"]) == [None, "female", "male"]
    assert list(t["age_group"]) == [None, None, None]
    assert list(t["person"]) == ["NA", "KA", None]  # "NA" is a person, not a missing value
    targets = encode_targets(t, ("expression", "gender"))
    np.testing.assert_array_equal(targets["expression"], [3, 5, -1])
    np.testing.assert_array_equal(targets["gender"], [-1, 1, 0])
    assert index.tasks_present() == ("gender", "expression")


def test_manifest_errors_name_the_problem(tmp_path):
    (tmp_path / "nopath.csv").write_text("file,gender\na.jpg,m\n")
    with pytest.raises(FacemtError, match="'path' column"):
        read_manifest(tmp_path / "nopath.csv")
    (tmp_path / "bad.csv").write_text("path,gender\na.jpg,m\nb.jpg,robot\n")
    with pytest.raises(FacemtError, match=r"bad.csv:3: unknown gender label 'robot'"):
        read_manifest(tmp_path / "bad.csv")
    (tmp_path / "nolabel.csv").write_text("path,person\na.jpg,1\n")
    with pytest.raises(FacemtError, match="no label column"):
        read_manifest(tmp_path / "nolabel.csv")
    with pytest.raises(FacemtError, match="no such file"):
        read_manifest(tmp_path / "missing.csv")
