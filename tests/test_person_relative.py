"""Person-relative expression: a face's expression read against the same person's other pictures
(fit fits it, the run carries it, evaluate / cv / predict --person-from use it)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import facemt
from facemt.checkpoint import load_checkpoint, read_config, save_checkpoint
from facemt.cli import main
from facemt.data import ImageCache, index_folder, person_of, persons_in
from facemt.engine import decode_images
from facemt.errors import FacemtError
from facemt.model import create_model
from facemt.relative import HEAD, VARIANTS, PersonRelative, centre, choose, fit_person_relative, pooled_scores
from facemt.tasks import TASKS, per_person

from conftest import TINY_FIT

EXPRESSIONS = TASKS["expression"].num_classes


def _posed(persons: int, seed: int, identity: float = 6.0, expression: float = 1.0):
    """Trunk-like features of a posed set: every person shows every expression twice; who the person
    is moves the features far more than what the face does."""
    rng = np.random.default_rng(seed)
    directions = np.random.default_rng(99).normal(size=(EXPRESSIONS, 64))  # the same expressions in every set
    feats, who, labels = [], [], []
    for p in range(persons):
        face = rng.normal(scale=identity, size=64)
        for k in range(2 * EXPRESSIONS):
            feats.append(face + expression * directions[k % EXPRESSIONS] + rng.normal(scale=0.3, size=64))
            who.append(f"p{p}")
            labels.append(k % EXPRESSIONS)
    return np.array(feats, dtype=np.float32), who, np.array(labels)


def test_reading_a_face_against_its_person_removes_who_it_is():
    x, who, y = _posed(12, seed=0)
    test_x, test_who, test_y = _posed(4, seed=1)
    head = fit_person_relative(x, who, y)
    relative = head.probabilities(test_x, test_who)
    assert relative.shape == (len(test_y), EXPRESSIONS) and np.allclose(relative.sum(1), 1, atol=1e-5)
    assert (relative.argmax(1) == test_y).mean() > 0.95
    # the same classifier on the raw features (no person subtracted) does far worse on new persons
    from sklearn.linear_model import LogisticRegression

    raw = LogisticRegression(C=0.01, max_iter=3000).fit(x, y).predict(test_x)
    assert (raw == test_y).mean() < 0.8


def test_faces_of_unknown_or_rarely_pictured_persons_are_left_to_the_head():
    x, who, y = _posed(6, seed=0)
    head = fit_person_relative(x, who, y, min_pictures=3)
    persons = ["a", "a", "a", "b", "b", None]
    out = head.probabilities(x[:6], persons)
    assert not np.isnan(out[:3]).any() and np.isnan(out[3:]).all()
    centred, ok = centre(x[:3], ["a"] * 3, 3)
    assert ok.all() and np.allclose(centred.mean(0), 0, atol=1e-5)
    # fewer than two expressions labelled on persons with enough pictures: nothing to fit
    assert fit_person_relative(x, who, np.where(y == 0, 0, -1)) is None
    assert fit_person_relative(x[:2], who[:2], y[:2]) is None


def test_two_expressions_give_a_two_class_classifier_over_the_whole_schema():
    x, who, y = _posed(8, seed=0)
    keep = np.isin(y, [1, 3])
    head = fit_person_relative(x[keep], np.array(who)[keep], y[keep])
    out = head.probabilities(x[keep], np.array(who)[keep])
    assert np.allclose(out[:, [0, 2, 4, 5]], 0) and (out.argmax(1) == y[keep]).mean() > 0.95


def test_a_run_carries_its_classifier_and_answers_the_same_after_loading(tmp_path):
    torch.manual_seed(0)
    model, pre = create_model("resnet18", None, image_size=32)
    start, _ = create_model("resnet18", None, image_size=32)
    x, who, y = _posed(4, seed=0)
    features = np.random.default_rng(0).normal(size=(len(y), model.trunk.num_features)).astype(np.float32)
    model.relative = fit_person_relative(features, who, y)
    start.relative = fit_person_relative(features[::-1].copy(), who, y)
    model.keep(start, ["gender"])  # a start model carrying its own classifier travels too
    save_checkpoint(tmp_path / "run", model, "resnet18", pre)
    assert read_config(tmp_path / "run")["person_relative"] == {"task": "expression", "min_pictures": 3,
                                                                "variant": "centred"}
    loaded, _, _ = load_checkpoint(tmp_path / "run")
    assert isinstance(loaded.relative, PersonRelative) and isinstance(loaded.kept.relative, PersonRelative)
    assert np.allclose(loaded.relative.probabilities(features, who), model.relative.probabilities(features, who),
                       atol=1e-6)
    own = np.random.default_rng(1).dirichlet(np.ones(EXPRESSIONS), size=len(y)).astype(np.float32)
    model.relative = fit_person_relative(features, who, y, variant="both x head")
    save_checkpoint(tmp_path / "run2", model, "resnet18", pre)
    loaded = load_checkpoint(tmp_path / "run2")[0].relative
    assert loaded.variant == "both x head" and loaded.mean.shape == (2 * model.trunk.num_features,)
    assert np.allclose(loaded.probabilities(features, who, own), model.relative.probabilities(features, who, own),
                       atol=1e-6)
    config = read_config(tmp_path / "run2")
    config["person_relative"]["variant"] = "sideways"  # a run from a newer facemt
    (tmp_path / "run2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FacemtError, match="unknown person-relative classifier 'sideways'"):
        load_checkpoint(tmp_path / "run2")


def _one_expression_each(persons: int, seed: int):
    """Features of persons who each show one expression (three frames of it): who the person is moves
    the features less than the expression does, and centring on the person leaves nothing."""
    rng = np.random.default_rng(seed)
    directions = np.random.default_rng(99).normal(size=(EXPRESSIONS, 64))
    feats, who, labels = [], [], []
    for p in range(persons):
        face, k = rng.normal(scale=0.5, size=64), p % EXPRESSIONS
        for _ in range(3):
            feats.append(face + 2.0 * directions[k] + rng.normal(scale=0.1, size=64))
            who.append(f"p{p}")
            labels.append(k)
    return np.array(feats, dtype=np.float32), who, np.array(labels)


def test_features_beside_the_centred_ones_read_persons_who_show_one_expression():
    x, who, y = _one_expression_each(36, seed=0)
    test_x, test_who, test_y = _one_expression_each(12, seed=1)
    accuracy = {name: (fit_person_relative(x, who, y, variant=name).probabilities(
        test_x, test_who, np.full((len(test_y), EXPRESSIONS), 1 / EXPRESSIONS)).argmax(1) == test_y).mean()
        for name in VARIANTS}
    assert accuracy["both"] > 0.9 and accuracy["both x head"] > 0.9 and accuracy["centred"] < 0.5


def test_both_x_head_is_both_multiplied_by_the_heads_probabilities():
    x, who, y = _posed(6, seed=0)
    own = np.random.default_rng(0).dirichlet(np.ones(EXPRESSIONS), size=len(y)).astype(np.float32)
    both = fit_person_relative(x, who, y, variant="both").probabilities(x, who)
    product = fit_person_relative(x, who, y, variant="both x head").probabilities(x, who, own)
    want = both * own / (both * own).sum(1, keepdims=True)
    assert np.allclose(product, want, atol=1e-5)
    with pytest.raises(ValueError, match="needs the head's probabilities"):
        fit_person_relative(x, who, y, variant="both x head").probabilities(x, who)


def test_choose_keeps_the_head_unless_a_classifier_beats_it_on_the_held_out_persons():
    x, who, y = _posed(10, seed=0)
    held_out = np.isin(who, ["p8", "p9"])
    guess = np.full((held_out.sum(), EXPRESSIONS), 1 / EXPRESSIONS, dtype=np.float32)
    relative, info = choose(x, who, y, guess, held_out)  # a head that knows nothing: a classifier wins
    assert relative is not None and info["best"] == info["variant"] != HEAD and info["val_images"] == held_out.sum()
    best = max(info["scores"], key=lambda k: (info["scores"][k]["accuracy"], -info["scores"][k]["log_loss"]))
    assert best == info["best"] and info["scores"][best]["accuracy"] > 0.95
    # held-out persons whose expressions look like the next one's to the features, and a head that knows them
    y = np.where(held_out, (y + 1) % EXPRESSIONS, y)
    sure = np.eye(EXPRESSIONS, dtype=np.float32)[y[held_out]] * 0.999 + 0.001 / EXPRESSIONS
    relative, info = choose(x, who, y, sure, held_out)
    assert relative is None and info["best"] == HEAD and "variant" not in info
    assert all(info["scores"][k]["accuracy"] < 0.5 for k in ("centred", "both"))
    relative, info = choose(x, who, y, sure, held_out, always=True)  # --person-relative on: the best classifier
    assert relative is not None and info["best"] == HEAD and info["variant"] in VARIANTS
    assert relative.variant == info["variant"]
    # two pictures of one person held out: too few to read against each other, so auto keeps the head
    relative, info = choose(x, who, y, guess[:2], np.arange(len(y)) < 2)
    assert relative is None and "no held-out person" in info["reason"]


def test_choose_on_several_groups_of_held_out_persons_pools_their_pictures():
    """fit --validation-groups: other groups' scores (each from a model trained without that group) are
    added to the held-out persons' own, weighted by their pictures, before the best is chosen."""
    x, who, y = _posed(10, seed=0)
    held_out = np.isin(who, ["p8", "p9"])
    y = np.where(held_out, (y + 1) % EXPRESSIONS, y)  # the held-out persons alone favour a sure head
    sure = np.eye(EXPRESSIONS, dtype=np.float32)[y[held_out]] * 0.999 + 0.001 / EXPRESSIONS
    alone = choose(x, who, y, sure, held_out)[1]
    assert alone["best"] == HEAD and "pooled" not in alone
    score = lambda acc: {"accuracy": acc, "log_loss": 1.0}  # noqa: E731
    other = {"val_images": 100, "scores": {HEAD: score(0.5), "centred": score(1.0), "both": score(0.9)}}
    relative, info = choose(x, who, y, sure, held_out, others=[other, other])
    n = alone["val_images"]
    assert info["pooled"]["groups"] == 3 and info["pooled"]["val_images"] == n + 200
    want = (alone["scores"]["centred"]["accuracy"] * n + 200) / (n + 200)
    assert abs(info["pooled"]["scores"]["centred"]["accuracy"] - want) < 1e-6
    assert set(info["pooled"]["scores"]) == {HEAD, "centred", "both"}  # only what every group scored
    assert info["best"] == "centred" == relative.variant and "3 groups" in info["reason"]
    assert info["scores"] == alone["scores"]  # the own group's scores are kept as measured
    # groups that agree with the own one change nothing; a group that scored nothing is no evidence
    agree = {"val_images": 100, "scores": {HEAD: score(1.0), "centred": score(0.2), "both": score(0.2),
                                           "both x head": score(0.9)}}
    assert choose(x, who, y, sure, held_out, others=[agree, {"reason": "none"}])[0] is None
    assert pooled_scores([{"reason": "none"}]) is None


@pytest.fixture(scope="module")
def relative_run(faces_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("relative") / "run"
    assert main(["fit", "--data", str(faces_dir), "--out", str(run), *TINY_FIT, "--epochs", "1",
                 "--person-relative", "on"]) == 0
    return run


def test_fit_decides_on_the_validation_persons_and_records_why(run_dir, relative_run):
    auto = read_config(run_dir)["person_relative_fit"]  # fit's default: auto
    assert auto["mode"] == "auto" and auto["val_images"] > 0 and set(auto["scores"]) == {HEAD, *VARIANTS}
    rank = {k: (v["accuracy"], -v["log_loss"]) for k, v in auto["scores"].items()}
    assert rank[auto["best"]] == max(rank.values()) and auto["used"] == (auto["best"] != HEAD)
    assert ("person_relative" in read_config(run_dir)) == auto["used"]
    on = read_config(relative_run)
    assert on["person_relative_fit"]["used"] and on["person_relative_fit"]["images"] == 72
    assert load_checkpoint(relative_run)[0].relative is not None  # off: tests/test_cli.py


@pytest.fixture(scope="module")
def two_persons(faces_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    for f in sorted(faces_dir.glob("*.jpg"))[:24]:  # two persons, 12 pictures each
        shutil.copy(f, folder / f.name)
    return folder


def test_evaluate_reads_each_person_together_unless_told_not_to(relative_run, two_persons, tmp_path, capsys):
    faces_dir = two_persons
    predictor = facemt.load(relative_run, device="cpu")
    index = index_folder(faces_dir)
    images = decode_images(index, predictor.preprocess, ImageCache(), None)
    persons = index.table["person"].tolist()
    alone, grouped = predictor.probabilities(images), predictor.probabilities(images, persons)
    assert not np.allclose(alone["expression"], grouped["expression"], atol=1e-4)
    for head in ("age_group", "gender"):  # one answer per person: the mean of the pictures' log-probabilities
        assert np.allclose(grouped[head], per_person(alone[head], persons), atol=1e-6)
        for person in set(persons):
            rows = grouped[head][np.array(persons) == person]
            assert np.allclose(rows, rows[0], atol=1e-6)
    results = []
    for flags in ([], ["--no-person-relative"]):
        capsys.readouterr()
        assert main(["evaluate", "--model", str(relative_run), "--data", str(faces_dir), "--json", *flags]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["person_relative"] and not results[1]["person_relative"]
    assert results[0]["per_person"] == ["age_group", "gender"] and results[1]["per_person"] == []
    assert any("one answer per person" in n for n in results[0]["notes"])
    manifest = tmp_path / "no_persons.csv"  # the same pictures, nobody's person known: every picture alone
    index.table.drop(columns=["person"]).assign(path=[str(Path(p).resolve()) for p in index.table["path"]]).to_csv(
        manifest, index=False)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(relative_run), "--data", str(manifest), "--json"]) == 0
    unknown = json.loads(capsys.readouterr().out)
    assert not unknown["person_relative"] and unknown["per_person"] == []
    assert unknown["metrics"]["expression"]["accuracy"] == results[1]["metrics"]["expression"]["accuracy"]
    for result, probs in zip(results, (grouped, alone)):
        for head in TASKS:
            y = np.array([TASKS[head].index(c) for c in index.table[head]])
            assert result["metrics"][head]["accuracy"] == pytest.approx((probs[head].argmax(1) == y).mean())


def _rows(text: str) -> dict[str, dict]:
    return {r["path"]: r for r in csv.DictReader(io.StringIO(text))}


def test_predict_person_from_name_or_folder(relative_run, two_persons, tmp_path, capsys):
    files = sorted(two_persons.glob("*.jpg"))
    assert main(["predict", *map(str, files), "--model", str(relative_run), "--csv", "--person-from", "name"]) == 0
    by_name = _rows(capsys.readouterr().out)
    assert main(["predict", *map(str, files), "--model", str(relative_run), "--csv"]) == 0
    alone = _rows(capsys.readouterr().out)
    predictor = facemt.load(relative_run, device="cpu")
    want = predictor.predict_persons(files, [person_of(f, "name") for f in files])
    columns = [f"expression_p_{c}" for c in TASKS["expression"].classes]
    for p in want:
        assert np.allclose([float(by_name[p.source][c]) for c in columns],
                           list(p.probabilities["expression"].values()), atol=1e-5)
        assert by_name[p.source]["gender"] == p.labels["gender"] and by_name[p.source]["age_group"] == p.labels["age_group"]
    for person in {person_of(f, "name") for f in files}:  # one age group and gender per person
        rows = [by_name[str(f)] for f in files if person_of(f, "name") == person]
        assert len({(r["gender"], r["age_group"]) for r in rows}) == 1
    assert any(by_name[f]["expression"] != alone[f]["expression"] or
               not np.allclose([float(by_name[f][c]) for c in columns], [float(alone[f][c]) for c in columns],
                               atol=1e-4) for f in by_name)
    # one folder per person reads the same persons
    for f in files:
        folder = tmp_path / f.name.split("_")[0]
        folder.mkdir(exist_ok=True)
        shutil.copy(f, folder / f"photo{len(list(folder.iterdir()))}.jpg")
    assert main(["predict", str(tmp_path), "--model", str(relative_run), "--json", "--person-from", "folder"]) == 0
    by_folder = json.loads(capsys.readouterr().out)
    assert sorted(p["expression"]["label"] for p in by_folder) == sorted(r["expression"] for r in by_name.values())


def test_predict_person_from_says_what_it_cannot_do(relative_run, faces_dir, tmp_path, capsys):
    odd = tmp_path / "holiday.jpg"
    shutil.copy(next(faces_dir.glob("*.jpg")), odd)
    capsys.readouterr()
    for args, message in ((["--max-faces", "2"], "does not go with --max-faces"),
                          (["--shard", "1/2", "--out", str(tmp_path / "p.csv")], "does not go with --shard")):
        assert main(["predict", str(faces_dir), "--model", str(relative_run), "--person-from", "name", *args]) == 2
        assert message in capsys.readouterr().err
    assert main(["predict", str(odd), "--model", str(relative_run), "--person-from", "name"]) == 2
    err = capsys.readouterr().err
    assert "holiday.jpg: the file name says no person" in err and "Traceback" not in err
    with pytest.raises(FacemtError, match="files but"):
        facemt.load(relative_run, device="cpu").predict_persons([odd], [])
    files = sorted(faces_dir.glob("*.jpg"))[:3]
    with pytest.raises(FacemtError, match="person-relative expression answers need PyTorch"):
        facemt.load(relative_run, engine="onnx").predict_persons(files, ["a"] * 3)
    assert person_of(faces_dir / "004_o_m_a_a.jpg", "name") == "004"
    assert person_of("KA.SU1.36.tiff", "name") == "jaffe:KA"


def test_predict_person_from_with_a_model_without_one_says_so(faces_dir, capsys):
    files = [str(f) for f in sorted(faces_dir.glob("*.jpg"))[:4]]
    assert main(["predict", *files, "--csv", "--person-from", "name"]) == 0  # the built-in model carries none
    captured = capsys.readouterr()
    assert "carries no person-relative expression classifier" in captured.err and "age group and gender" in captured.err
    grouped = _rows(captured.out)
    assert main(["predict", *files, "--csv"]) == 0
    alone = _rows(capsys.readouterr().out)
    columns = [c for c in next(iter(alone.values())) if c.startswith(("expression_p_", "gender_p_", "age_group_p_"))]
    for head in ("age_group", "gender"):
        head_columns = [c for c in columns if c.startswith(f"{head}_p_")]
        for person in {person_of(f, "name") for f in files}:
            mine = [f for f in files if person_of(f, "name") == person]
            probs = np.array([[float(alone[f][c]) for c in head_columns] for f in mine])
            want = per_person(probs, [person] * len(mine))
            assert np.allclose([[float(grouped[f][c]) for c in head_columns] for f in mine], want, atol=1e-5)
    for f in files:  # expression: the network's answer, as without --person-from
        assert np.allclose([float(grouped[f][c]) for c in columns if c.startswith("expression_p_")],
                           [float(alone[f][c]) for c in columns if c.startswith("expression_p_")], atol=1e-6)


def test_a_persons_pictures_share_one_age_group_and_gender():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7], [0.5, 0.5]], dtype=np.float32)
    out = per_person(probs, ["a", "a", "a", None, "b"])
    mean_log = np.log(probs[:3]).mean(0)
    want = np.exp(mean_log) / np.exp(mean_log).sum()
    assert np.allclose(out[:3], want, atol=1e-6) and out[0].argmax() == 0  # two of three pictures say class 0
    assert np.allclose(out[3:], probs[3:])  # an unknown person and a person with one picture: as they were
    import pandas as pd

    table = pd.DataFrame({"person": ["01", "01", None, "01"], "source": ["faces", "faces", "faces", "rafd"]})
    assert persons_in(table) == ["faces/01", "faces/01", None, "rafd/01"]  # two sets: two people called 01
    assert persons_in(table.assign(source="faces")) == ["01", "01", None, "01"]
