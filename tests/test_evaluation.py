import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import facemt
import facemt.report
from facemt import FacemtError
from facemt.cli import main
from facemt.data import index_folder
from facemt.engine import TrainConfig
from facemt.evaluation import RANDOM_SPLIT_WARNING, expected_calibration_error, head_metrics
from facemt.splits import make_folds
from facemt.synth import generate
from facemt.tasks import PERSON_HEADS, per_person

TINY = TrainConfig(epochs=1, image_size=32, batch_size=16, augment="light", device="cpu")


def _table(persons, per_person=4):
    rows = []
    for p in range(persons):
        for k in range(per_person):
            rows.append({"path": f"{p}_{k}.jpg", "person": str(p), "source": "t",
                         "age_group": ["young", "middle", "old"][p % 3], "gender": ["male", "female"][p % 2],
                         "expression": ["anger", "happiness"][k % 2]})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("persons,folds", [(12, 5), (6, 5), (3, 5), (20, 3)])
def test_subject_folds_never_share_a_person(persons, folds):
    table = _table(persons)
    result = make_folds(table, "subject", folds, seed=0)
    if persons <= folds:
        assert len(result) == persons  # leave one person out
    seen = []
    for train, test in result:
        assert not set(table["person"].iloc[train]) & set(table["person"].iloc[test])
        assert len(train) + len(test) == len(table)
        seen.extend(test)
    assert sorted(seen) == list(range(len(table)))


def test_random_folds_do_share_persons_and_test_size_holds_out_a_fraction():
    table = _table(6, 12)
    (train, test), = make_folds(table, "random", 5, seed=0, test_size=0.3)
    assert len(test) == round(0.3 * len(table))
    assert set(table["person"].iloc[train]) & set(table["person"].iloc[test])


def test_head_metrics_and_ece():
    y = np.array([0, 1, 1, -1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    m = head_metrics(y, probs, ("male", "female"))
    assert m["n"] == 3 and m["accuracy"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((1 + 0.5) / 2)
    assert m["confusion"] == [[1, 0], [1, 1]]
    assert m["per_class"]["female"]["recall"] == pytest.approx(0.5)
    perfect = expected_calibration_error(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert perfect == 0.0
    assert expected_calibration_error(np.array([1, 1]), np.array([[0.9, 0.1], [0.9, 0.1]])) == pytest.approx(0.9)


@pytest.fixture(scope="module")
def cv_result(faces_dir):
    return facemt.cross_validate(index_folder(faces_dir), TINY, folds=2, split="both", seeds=1, fit_model=False)


def test_cv_compares_multi_and_single_task_on_identical_folds(cv_result):
    r = cv_result.records
    assert set(r["protocol"]) == {"subject", "random"}
    for (protocol, seed, fold), g in r.groupby(["protocol", "seed", "fold"]):
        assert set(g[g["model"] == "multitask"]["head"]) == {"age_group", "gender", "expression"}
        assert sorted(g[g["model"] == "single"]["head"]) == ["age_group", "expression", "gender"]
        assert g["test_persons"].nunique() == 1  # every model saw the same test fold
    assert cv_result.warnings == [RANDOM_SPLIT_WARNING]
    summary = cv_result.summary()
    assert {"multitask_mean", "single_mean", "diff_mean", "diff_ci_low", "majority_mean", "identity_leak_gap"} <= set(summary.columns)
    # the person-relative classifier is scored beside every multi-task model, on expression alone
    relative = r[r["model"] == "person-relative"]
    assert set(relative["head"]) == {"expression"} and len(relative) == len(r[(r["model"] == "multitask")
                                                                                & (r["head"] == "expression")])
    expression = summary[summary["head"] == "expression"]
    assert expression["relative_gain_mean"].notna().all() and summary["relative_gain_mean"].isna().sum() == 4
    assert "## Expression read per person" in facemt.report.render_markdown(cv_result)
    # age group and gender read once per test person beside every multi-task and untouched model
    for name in ("per-person", "zero-shot per-person"):
        assert set(r[r["model"] == name]["head"]) == {"age_group", "gender"}
    assert len(r[r["model"] == "per-person"]) == len(r[(r["model"] == "multitask") & (r["head"] != "expression")])
    assert summary["per_person_gain_mean"].notna().sum() == summary["per_person_zero_gain_mean"].notna().sum() == 4
    assert summary[summary["head"] == "expression"]["per_person_mean"].isna().all()
    # each image decoded once per input size for all 16 models: theirs (32 px) and the untouched base's
    assert cv_result.config["images_decoded"] == 72 * 2


def test_cv_scores_the_untouched_starting_model_on_the_same_folds(cv_result, faces_dir):
    from facemt.data import DataIndex, ImageCache
    from facemt.engine import decode_images
    from facemt.evaluation import evaluate_predictions

    index = index_folder(faces_dir)
    assert cv_result.config["zero_shot"] == "base"
    zero = cv_result.records[cv_result.records["model"] == "zero-shot"]
    together = cv_result.records[cv_result.records["model"] == "zero-shot per-person"]
    assert len(zero) == 2 * 2 * 3  # protocols x folds x heads, once per fold (not per trained model)
    base = facemt.load(device="cpu")
    for k, (_, test_rows) in enumerate(make_folds(index.table, "subject", 2, TINY.seed)):
        sub = DataIndex(index.table.iloc[test_rows].reset_index(drop=True), [])
        probs = base.probabilities(decode_images(sub, base.preprocess, ImageCache(), None))
        expected = evaluate_predictions(sub.table, probs)
        for head, m in expected.items():
            got = zero[(zero.protocol == "subject") & (zero.fold == k) & (zero["head"] == head)]["accuracy"]
            assert got.item() == pytest.approx(m["accuracy"])
        # read per person: one answer for all of a test person's pictures (the mean of their log-probabilities)
        persons = list(sub.table["person"])
        pooled = {t: per_person(probs[t], persons) for t in PERSON_HEADS}
        for head, m in evaluate_predictions(sub.table, pooled).items():
            got = together[(together.protocol == "subject") & (together.fold == k)
                              & (together["head"] == head)]["accuracy"]
            assert got.item() == pytest.approx(m["accuracy"])
            answers = pd.Series(pooled[head].argmax(1)).groupby(sub.table["person"].to_numpy()).nunique()
            assert (answers == 1).all()
    summary = cv_result.summary()
    multitask = cv_result.records[cv_result.records["model"] == "multitask"].set_index(["protocol", "seed", "fold", "head"])
    gains = (multitask["accuracy"] - zero.set_index(["protocol", "seed", "fold", "head"])["accuracy"]).groupby(
        level=["protocol", "head"]).mean()
    for row in summary.itertuples():
        assert row.gain_mean == pytest.approx(gains[(row.protocol, row.head)])
    report = facemt.report.render_markdown(cv_result)
    assert "not fine-tuned" in report and "initial weights: the built-in base model" in report


def test_cv_from_imagenet_or_random_weights_has_no_zero_shot_rows(faces_dir):
    from dataclasses import replace

    result = facemt.cross_validate(index_folder(faces_dir), replace(TINY, init_from=None), folds=2, baselines=False,
                                   fit_model=False)
    assert set(result.records["model"]) == {"multitask", "person-relative", "per-person"} and "zero_shot_mean" not in result.summary()
    assert result.config["zero_shot"] is None and "not fine-tuned" not in facemt.report.render_markdown(result)


def test_single_task_models_have_one_head(cv_result):
    h = cv_result.histories
    for head in ("age_group", "gender", "expression"):
        single = h[h["model"] == f"single:{head}"]
        assert single[f"train_{head}_acc"].notna().all()
        others = [c for c in h.columns if c.startswith("train_") and c.endswith("_acc") and head not in c and "mean" not in c]
        assert single[others].isna().all().all()


def test_subject_protocol_never_tests_a_training_person(cv_result, faces_dir):
    table = index_folder(faces_dir).table
    for (seed, fold), g in cv_result.records[cv_result.records["protocol"] == "subject"].groupby(["seed", "fold"]):
        test_persons = set(g["test_persons"].iloc[0].split())
        assert test_persons and len(test_persons) < table["person"].nunique()


def test_same_seeds_same_results(faces_dir):
    index = index_folder(faces_dir)
    a = facemt.cross_validate(index, TINY, folds=2, split="subject", seeds=1, baselines=False, fit_model=False)
    b = facemt.cross_validate(index, TINY, folds=2, split="subject", seeds=1, baselines=False, fit_model=False)
    pd.testing.assert_frame_equal(a.records, b.records)


def test_cv_cli_writes_a_consistent_report(faces_dir, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["cv", "--data", str(faces_dir), "--out", str(out), "--folds", "2", "--split", "both", "--no-baselines",
            "--no-fit-model", "--epochs", "1", "--image-size", "32", "--batch-size", "16", "--device", "cpu"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "identity leak" in captured.err
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "results.json", "results.csv", "summary.csv", "history.csv", "comparison.png",
            "learning_curves_subject.png", "learning_curves_random.png", "confusion_subject.png",
            "confusion_random.png"} <= names
    results = json.loads((out / "results.json").read_text())
    csv_records = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert len(results["records"]) == len(csv_records)
    report = (out / "report.md").read_text()
    assert results["config"]["image_size"] == 32 and "32 px faces, augmentation" in report
    for row in results["summary"]:
        mean, std = 100 * row["multitask_mean"], 100 * row["multitask_std"]
        assert f"| {row['protocol']} | {row['head']} | {mean:.1f} ± {std:.1f} |" in report
        recomputed = csv_records[(csv_records.protocol == row["protocol"]) & (csv_records.model == "multitask")
                                 & (csv_records["head"] == row["head"])]["accuracy"].mean()
        assert recomputed == pytest.approx(row["multitask_mean"])
        if row["head"] != "expression":  # age group and gender read per person, in the report and on screen
            together = f"{100 * row['per_person_mean']:.1f} ± {100 * row['per_person_std']:.1f}"
            assert f"| {row['protocol']} | {row['head']} | {mean:.1f} ± {std:.1f} | {together} |" in report
            assert f"{row['protocol']} {row['head']} read per person: {together} %" in captured.out
    assert "## Age group and gender read per person" in report
    assert "Warning" in report
    assert main(argv) == 2  # refuses to overwrite a report
    capsys.readouterr()
    assert main([*argv, "--overwrite", "--json", "--split", "subject"]) == 0  # the last --split given wins
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert {(r["protocol"], r["head"]) for r in summary} == {(r["protocol"], r["head"]) for r in results["summary"]
                                                            if r["protocol"] == "subject"}
    assert json.loads((out / "results.json").read_text())["summary"] == summary  # replaced, not merged


def test_cv_scores_what_fit_writes_on_each_fold(faces_dir, run_dir, tmp_path, capsys):
    """cv's model ``fit`` is facemt.engine.fit itself on each fold's training persons (never-worse rule and
    person-relative step included), scored on the fold's test persons, in the report and on screen."""
    from facemt.config import TrainConfig as Config
    from facemt.data import DataIndex, ImageCache
    from facemt.engine import decode_images, fit, predict_images
    from facemt.relative import with_person_relative

    out = tmp_path / "report"
    assert main(["cv", "--data", str(faces_dir), "--out", str(out), "--folds", "2", "--no-baselines", "--epochs", "2",
                 "--image-size", "32", "--batch-size", "16", "--device", "cpu", "--init-from", str(run_dir)]) == 0
    screen = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    records = pd.DataFrame(results["records"])
    config = Config.from_dict(results["config"]["train"])
    index = index_folder(faces_dir)
    chosen = {(f["seed"], f["fold"]): f for f in results["config"]["fit_folds"]}
    assert len(chosen) == 2
    for k, (train_rows, test_rows) in enumerate(make_folds(index.table, "subject", 2, config.seed)):
        result = fit(DataIndex(index.table.iloc[train_rows].reset_index(drop=True), []), config, cache=ImageCache())
        test = index.table.iloc[test_rows].reset_index(drop=True)
        images = decode_images(DataIndex(test, []), result.preprocess, ImageCache(), None)
        probs = predict_images(result.model, images, result.preprocess)
        probs["expression"] = with_person_relative(result.model, images, result.preprocess, list(test["person"]),
                                                   probs["expression"])
        for head, m in facemt.evaluation.evaluate_predictions(test, probs).items():
            got = records[(records["model"] == "fit") & (records["fold"] == k) & (records["head"] == head)]
            assert got["accuracy"].item() == pytest.approx(m["accuracy"], abs=1.5 / len(test))
        assert chosen[config.seed, k]["answered_by_start"] == result.kept
        assert chosen[config.seed, k]["best_epoch"] == result.best_epoch
    # fit per person beside the untouched model per person; fit minus untouched paired per fold
    assert set(records[records["model"] == "fit per-person"]["head"]) == {"age_group", "gender"}
    report = (out / "report.md").read_text()
    assert "what fit writes" in report and "heads answered by the starting model" in report
    epochs = np.mean([f["best_epoch"] for f in chosen.values()])
    assert f"| subject | 2 | {epochs:.1f} |" in report  # what fit chose, per split
    for row in results["summary"]:
        fitted = records[(records["model"] == "fit") & (records["head"] == row["head"])].set_index("fold")["accuracy"]
        zero = records[(records["model"] == "zero-shot") & (records["head"] == row["head"])].set_index("fold")["accuracy"]
        assert row["fit_gain_mean"] == pytest.approx((fitted - zero).mean())
        cell = f"{100 * row['fit_mean']:.1f} ± {100 * row['fit_std']:.1f}"
        assert f"{cell} | {100 * row['fit_gain_mean']:+.1f}" in report
        by_start = sum(row["head"] in f["answered_by_start"] for f in chosen.values())
        assert (f"subject {row['head']} as fit writes it: {cell} %, minus not fine-tuned {100 * row['fit_gain_mean']:+.1f}"
                in " ".join(screen.split()))
        assert f"answered by the starting model in {by_start} of 2 folds" in " ".join(screen.split())


def test_cv_report_says_what_fit_chose_and_when_its_rule_could_not_apply():
    from facemt.report import _fit_section

    fold = {"protocol": "subject", "seed": 0, "best_epoch": 4, "refit": False, "person_relative": None,
            "never_worse_skipped": None}
    kept = {"gender": "not trained: the data labels fewer than two of its classes", "expression": "tie"}
    cfg = {"tasks": ["expression"], "fit_folds": [{**fold, "fold": 0, "answered_by_start": kept},
                                                  {**fold, "fold": 1, "best_epoch": 6, "person_relative": "centred",
                                                   "answered_by_start": {"gender": kept["gender"]}}]}
    text = "\n".join(_fit_section(cfg))
    assert "| subject | 2 | 5.0 | expression 1 | the head 1, centred 1 |" in text
    assert "cannot train (no labels, or labels of one class: gender)" in text and "could not apply" not in text
    why = "the run's preprocessing (image size or crop) differs from the start model's"
    for f in cfg["fit_folds"]:
        f.update(never_worse_skipped=why, answered_by_start={})
    text = "\n".join(_fit_section(cfg))
    assert "| subject | 2 | 5.0 | rule skipped in 2 folds |" in text and f"could not apply: {why}" in text
    assert "does not beat it on those validation persons" in text
    cfg["train"] = {"validation_groups": 3}  # the choices made on three groups of validation persons
    assert "does not beat it on 3 disjoint groups of validation persons together" in "\n".join(_fit_section(cfg))


def test_cv_report_names_the_face_size_the_models_trained_at():
    """No --image-size given: the size comes from the initial model, and the report says which."""
    from facemt.report import _size_text

    assert _size_text({"image_size": 112, "train": {"image_size": None}}) == "112 px faces (the initial model's)"
    assert _size_text({"image_size": 64, "train": {"image_size": 64}}) == "64 px faces"
    assert _size_text({"train": {"image_size": 48}}) == "48 px faces"  # a report written before the size was kept


def test_cv_rejects_bad_settings(faces_dir):
    with pytest.raises(FacemtError):
        facemt.cross_validate(index_folder(faces_dir), TINY, split="sideways")
    with pytest.raises(FacemtError):
        facemt.cross_validate(index_folder(faces_dir), TINY, folds=1)


def test_evaluate_cli_json(run_dir, faces_dir, capsys):
    assert main(["evaluate", str(run_dir), "--data", str(faces_dir), "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 72 and out["tta"] is False
    for head in ("age_group", "gender", "expression"):
        m = out["metrics"][head]
        assert m["n"] == 72 and 0 <= m["accuracy"] <= 1 and 0 <= m["ece"] <= 1
        assert sum(map(sum, m["confusion"])) == 72
    assert main(["evaluate", str(run_dir), "--data", str(faces_dir), "--json", "--device", "cpu", "--tta"]) == 0
    tta = json.loads(capsys.readouterr().out)
    assert tta["tta"] is True and tta["metrics"]["expression"]["n"] == 72
    assert tta["metrics"]["expression"]["ece"] != out["metrics"]["expression"]["ece"]
    assert main(["evaluate", str(run_dir), "--data", str(faces_dir), "--device", "cpu"]) == 0
    assert "confusion" in capsys.readouterr().out


def test_evaluate_says_when_the_images_are_the_ones_the_run_was_fit_on(run_dir, faces_dir, tmp_path, capsys):
    from facemt.checkpoint import read_config
    from facemt.evaluation import seen_in_fit

    config = read_config(run_dir)
    validated = sum(f.name.split("_")[0] in config["split"]["val_persons"] for f in faces_dir.glob("*.jpg"))
    assert 0 < validated < 72
    assert main(["evaluate", str(run_dir), "--data", str(faces_dir), "--json", "--device", "cpu"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    said = f"72 of these 72 images are in the data this run was fit on ({72 - validated} trained on, {validated} of"
    assert sum(said in n and "facemt cv" in n for n in notes) == 1
    other = tmp_path / "other"
    generate(other, persons=2, size=(48, 60), seed=7)  # faces the run never saw
    assert main(["evaluate", str(run_dir), "--data", str(other), "--json", "--device", "cpu"]) == 0
    assert not any("fit on" in n for n in json.loads(capsys.readouterr().out)["notes"])
    table = index_folder(faces_dir).table
    base = json.loads((Path(facemt.__file__).parent / "base" / "config.json").read_text())
    assert seen_in_fit(base, table) is None  # the built-in model keeps its own held-out lists
    moved = {**config, "sources": [str(tmp_path / "gone")]}
    assert seen_in_fit(moved, table) is None  # a source no longer there: nothing to say
    changed = {**config, "split": {**config["split"], "train_images": config["split"]["train_images"] - 1}}
    assert seen_in_fit(changed, table) is None  # files added since: which ones fit saw cannot be told
    assert seen_in_fit(config, table) == (72 - validated, validated)


def test_macro_f1_averages_over_the_classes_in_the_test_labels():
    classes = ("anger", "disgust", "fear", "happiness", "neutrality", "sadness")
    y = np.array([3] * 30 + [4] * 30)  # a two-expression test set, predicted perfectly but for one face
    probs = np.eye(6)[np.r_[y[:-1], 3]]
    m = head_metrics(y, probs, classes)
    assert m["accuracy"] == pytest.approx(59 / 60)
    assert m["macro_f1"] > 0.95  # not diluted by the four classes the test set does not hold


def test_person_consistency_counts_label_changes_within_each_person():
    """Age group and gender cannot change within a person: a person whose pictures get two genders is
    counted, a person of one picture is not, and person 0 of two sources are two people."""
    from facemt.evaluation import person_consistency, recall_by

    table = _table(3, per_person=4)
    table = pd.concat([table, pd.DataFrame([{"path": "x.jpg", "person": "0", "source": "u", "age_group": "old",
                                             "gender": "female", "expression": "anger"}])], ignore_index=True)
    gender = table["gender"].to_numpy().copy()
    gender[1] = "female"  # person 0 (male) called female in one of four pictures
    age = table["age_group"].to_numpy().copy()
    age[[9, 10]] = "young"  # person 2 (old) called young twice
    out = person_consistency(table, {"gender": gender, "age_group": age})
    assert len(out) == 6  # 3 persons x 2 heads; source u's single picture is not a person with pictures to compare
    changed = out.set_index(["person", "head"])["changed"]
    assert changed[("0", "gender")] and changed[("2", "age_group")]
    assert changed.sum() == 2
    assert out.set_index(["person", "head"]).loc[("0", "gender"), "majority"] == 0.75
    recall = recall_by(table, {"gender": gender}, "gender", "expression").set_index(["expression", "gender"])
    # persons 0 and 2 are men with two happiness pictures each; person 0's picture 1 is one of them
    assert recall.loc[("happiness", "male"), "recall"] == 0.75 and recall.loc[("anger", "male"), "recall"] == 1.0
    assert recall.loc[("happiness", "male"), "n"] == 4


def test_stability_benchmark_flags_flips_on_generated_faces(faces_dir):
    """benchmarks/stability.py end to end on generated portraits: every condition is measured for every
    face found, no noise means no change, and the table has an 'all' row per condition."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "stability_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "stability.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from facemt.synth import draw_face, make_person

    rng = np.random.default_rng(0)
    items = []
    for i in range(3):
        path = faces_dir.parent / f"stability_{i}.png"
        draw_face(make_person(i, "young", "female", rng), "happiness", rng, (240, 300)).save(path)
        items.append(("generated", path))
    model = facemt.load()
    frame = script.measure(model, items, draws=2)
    assert set(frame["condition"]) == {"same photo at 2x / 4x", "landmark noise 2 % of eye distance",
                                       "landmark noise 5 % of eye distance"}
    assert (frame.groupby("condition").size() == [6, 6, 6]).all()
    assert frame["change"].between(0, 1).all() and frame["flipped"].dtype == bool
    still = script.moved(script.default_detector().detect(
        __import__("PIL.Image", fromlist=["Image"]).open(items[0][1]).convert("RGB"))[0], 0.0, rng)
    assert len(still.landmarks) == 5
    lines = script.markdown(frame, model.tasks, "t", "c")
    assert sum("**all**" in line for line in lines) == 3
