"""Studio sets as data (facemt CSV manifests named labels.csv, extra columns, person ids per set) and the
studio benchmark end to end on generated folders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from facemt.data import load_sources
from facemt.splits import make_folds, person_groups
from facemt.synth import generate

ROOT = Path(__file__).resolve().parents[1]
ETHNICITIES = ("white", "black")


@pytest.fixture(scope="module")
def studio_root(faces_dir, tmp_path_factory):
    """Two studio-like sets of generated faces: ``cfd`` (gender, expression, ethnicity; 6 persons) and
    ``nimstim`` (age group, gender, expression; 5 other persons), each a labels.csv whose persons are called
    01, 02, ... in both."""
    root = tmp_path_factory.mktemp("studio")
    other = tmp_path_factory.mktemp("more_faces")
    generate(other, persons=5, size=(48, 60), seed=2)
    for name, folder in (("cfd", faces_dir), ("nimstim", other)):
        rows = []
        for f in sorted(folder.glob("*.jpg")):
            person, age, gender, expression, _ = f.stem.split("_")
            rows.append({"path": str(f), "age_group": age if name == "nimstim" else "", "gender": gender,
                         "expression": expression, "person": f"{int(person):02d}",
                         "ethnicity": ETHNICITIES[int(person) > 4] if name == "cfd" else ""})
        (root / name).mkdir()
        pd.DataFrame(rows).to_csv(root / name / "labels.csv", index=False)
    return root


def test_studio_manifests_load_as_they_are(studio_root):
    index = load_sources([str(studio_root / "cfd" / "labels.csv"), str(studio_root / "nimstim" / "labels.csv")])
    table = index.table
    assert set(table["source"]) == {"cfd", "nimstim"}  # named by folder: both files are labels.csv
    assert set(table["ethnicity"].dropna()) == set(ETHNICITIES)  # an extra column is carried
    assert table["age_group"][table["source"] == "cfd"].isna().all()
    # person 01 of cfd and person 01 of nimstim are two people: never one group in a split
    groups = person_groups(table)
    assert len(set(groups)) == 11 and table["person"].nunique() == 6
    for train, test in make_folds(table, "subject", 3, seed=0):
        assert not set(groups[train]) & set(groups[test])
    renamed = load_sources([f"lab={studio_root / 'cfd' / 'labels.csv'}"])
    assert set(renamed.table["source"]) == {"lab"}


def test_studio_benchmark_runs_end_to_end(studio_root, run_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("studio_bench", ROOT / "benchmarks" / "studio.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    split = tmp_path / "split.txt"
    assert script.main(["--data-root", str(studio_root), "--split", str(split), "--write-split"]) == 0
    chosen = script.read_split(split)
    assert chosen and all(c.split("/")[0] in ("cfd", "nimstim") for c in chosen)
    results = tmp_path / "RESULTS.md"
    assert script.main(["--data-root", str(studio_root), "--split", str(split), "--model", str(run_dir),
                        "--fine-tune", "--epochs", "1", "--json", str(tmp_path / "s.json"),
                        "--results", str(results)]) == 0
    rows = pd.DataFrame(json.loads((tmp_path / "s.json").read_text()))
    cfd = rows[rows["set"] == "cfd (test persons)"]
    assert {"female recall", "male recall"} <= set(cfd[cfd["head"] == "gender"]["group"])
    assert any(" x " in g for g in cfd["group"])  # gender accuracy per gender x ethnicity
    assert set(rows[rows["group"] == "cv multitask"]["set"]) == {"cfd (all persons)", "nimstim (all persons)"}
    assert rows["accuracy"].between(0, 1).all() and "### Studio benchmark" in results.read_text()


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_studio_ablation_table_reads_the_studio_benchmark_rows(tmp_path, capsys):
    ablate = _script("ablate_studio")
    rows = {"reference": [{"set": "cfd (test persons)", "head": "gender", "group": "female recall", "n": 10,
                           "accuracy": 0.9},
                          {"set": "cfd (test persons)", "head": "gender", "group": "female x black", "n": 4,
                           "accuracy": 0.75},
                          {"set": "cfd (test persons)", "head": "gender", "group": "male x white", "n": 5,
                           "accuracy": 1.0}],
            "grey": [{"set": "cfd (test persons)", "head": "gender", "group": "female recall", "n": 10,
                      "accuracy": 0.5}]}
    for name, r in rows.items():  # finished variants are read back, not retrained
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    assert ablate.main(["--data-root", str(tmp_path), "--init-from", "nowhere", "--only", "reference,grey",
                        "--out", str(tmp_path), "--results", str(tmp_path / "R.md")]) == 0
    text = (tmp_path / "R.md").read_text()
    reference = next(line for line in text.splitlines() if line.startswith("| reference |"))
    assert "| 90 (10) |" in reference and "75 (female x black, 4)" in reference
    grey = next(line for line in text.splitlines() if line.startswith("| grey |"))
    assert "| 50 (10) |" in grey and grey.rstrip().endswith("| - |")
    with pytest.raises(SystemExit):
        ablate.main(["--data-root", str(tmp_path), "--init-from", "x", "--only", "colour"])
    assert "unknown variants" in capsys.readouterr().err


def test_pretrain_grey_study_decodes_faces_without_colour(faces_dir):
    import sys

    from facemt.transforms import PreprocessConfig

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        pretrain = _script("pretrain")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    face = str(sorted(faces_dir.glob("*.jpg"))[0])
    cfg = PreprocessConfig(image_size=32, crop="none")
    colour = pretrain.ImageCache().load([face], cfg)[0][0]
    grey = pretrain.GreyCache().load([face], cfg)[0][0]
    assert np.ptp(colour.astype(int), axis=2).max() > 10  # the generated face has colour ...
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()  # ... the study drops it
    assert np.abs(grey[..., 0].astype(int) - colour.mean(2)).mean() < 20


def test_aux_age_study_head_is_trained_on_utk_ages_then_removed(tmp_path):
    """pretrain.py --aux-age-weight: the study's age_years head lives only in that process's schema; the saved
    run has the three FACES heads, unchanged, and loads anywhere. Run in a subprocess: the study patches the
    schema of the process it runs in."""
    import subprocess
    import sys

    import facemt

    run = tmp_path / "run"
    table = pd.DataFrame({"path": ["/x/25_1_0_2017.jpg.chip.jpg", "/x/80_0_0_2017.jpg.chip.jpg", "/y/a.jpg"],
                          "source": ["utkface", "utkface", "studio"]})
    table.to_csv(tmp_path / "rows.csv", index=False)
    code = f"""
import sys, json
import pandas as pd
sys.path.insert(0, {str(ROOT / 'benchmarks')!r})
import pretrain
from facemt.checkpoint import save_checkpoint
from facemt.data import DataIndex
from facemt.model import create_model
index = DataIndex(pd.read_csv({str(tmp_path / 'rows.csv')!r}), [])
bins = pretrain.age_bins(index)
model, pre = create_model("resnet18", ("age_group", "gender", "expression", "age_years"), image_size=32)
model.temperatures = {{"age_group": 1.5, "gender": 1.0, "expression": 1.0, "age_years": 2.0}}
save_checkpoint({str(run)!r}, model, "resnet18", pre, {{"calibration": {{"temperature": model.temperatures}},
                "train": {{"tasks": list(model.tasks), "loss_weights": {{"age_years": 0.5}}}}}})
pretrain.drop_aux_head({str(run)!r}, 0.5)
print(json.dumps({{"bins": bins, "head": model.heads["age_years"].weight.shape[0],
                   "gender": model.heads["gender"].weight.sum().item()}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["bins"] == ["24-28", "79+", None] and result["head"] == 13  # masked where not UTKFace
    predictor = facemt.load(run, engine="torch")  # this process knows nothing of age_years
    assert predictor.tasks == ("age_group", "gender", "expression")
    assert predictor.model.temperatures["age_group"] == 1.5
    assert abs(predictor.model.heads["gender"].weight.sum().item() - result["gender"]) < 1e-5
    config = json.loads((run / "config.json").read_text())
    assert config["aux_age"]["weight"] == 0.5 and config["train"] == {"tasks": ["age_group", "gender", "expression"],
                                                                      "loss_weights": {}}
    assert "age_years" not in json.dumps(config["calibration"])


def test_fine_tuning_study_writes_its_sets_as_manifests_cv_reads(studio_root, tmp_path, capsys):
    from facemt.tasks import TASKS

    script = _script("finetune")
    split = tmp_path / "split.txt"
    split.write_text("cfd/01\nnimstim/01\nnimstim/02\n")
    assert script.main(["--data-root", str(studio_root), "--split", str(split), "--manifests", str(tmp_path / "m")]) == 0
    sets = script.shared_sets(studio_root, split)
    for name, index in sets.items():
        read = load_sources([tmp_path / "m" / f"{name}.csv"]).table
        columns = ["person", *TASKS]
        pd.testing.assert_frame_equal(read[columns].astype(object).where(read[columns].notna(), None),
                                      index.table[columns].astype(object).where(index.table[columns].notna(), None))
    assert f"nimstim+rafd.csv: {len(sets['nimstim+rafd'].table)} pictures of 2 persons" in capsys.readouterr().out


def test_fine_tuning_study_scores_untouched_tuned_and_fit_on_the_same_folds(studio_root, faces_dir, run_dir, tmp_path):
    script = _script("finetune")
    split = tmp_path / "split.txt"
    split.write_text("cfd/01\ncfd/02\nnimstim/01\nnimstim/02\n")
    sets = script.shared_sets(studio_root, split)
    assert set(sets) == {"cfd", "nimstim+rafd"} and len(sets["cfd"].table) == 24  # 2 persons x 12 pictures
    one = script.subset(sets["cfd"], 1).table  # --persons: every picture of the persons drawn
    assert one["person"].nunique() == 1 and len(one) == 12
    csv, results = tmp_path / "folds.csv", tmp_path / "RESULTS.md"
    assert script.main(["--no-shared", "--set", f"synth={faces_dir}", "--model", str(run_dir), "--only",
                        "defaults,linear-probe", "--folds", "2", "--train", "epochs=1,batch_size=16",
                        "--csv", str(csv), "--results", str(results)]) == 0
    folds = pd.read_csv(csv)
    relative = {f"relative-{trunk}{rows}" for trunk in ("tuned", "start") for rows in ("", "-all")}
    wise = {f"wise-{a}" for a in script.WISE}
    assert set(folds["arm"]) == {"untouched", "tuned", "blend", "fit", "step"} | relative | wise
    assert folds.loc[folds["arm"].isin(wise), "val_arm"].between(0, 1).all()
    assert set(folds["fold"]) == {0, 1}
    assert set(folds.loc[folds["arm"].isin(relative | {"step"}), "head"]) == {"expression"}
    # fit's person-relative step as fit runs it: what it chose, and the fit arm's answer where it chose the head
    steps = folds[folds["arm"] == "step"].set_index(["variant", "fold", "head"])
    assert len(steps) == 4 and set(steps["step_choice"]) <= {"head", "centred", "both", "both x head"}
    fitted = folds[folds["arm"] == "fit"].set_index(["variant", "fold", "head"])["accuracy"]
    on_head = steps["step_choice"] == "head"
    assert np.allclose(steps.loc[on_head, "accuracy"], fitted.loc[steps.index[on_head]])
    # every candidate's evidence: the choice is the best on validation; a chosen classifier's recorded test
    # accuracy is the step's own
    for _, r in steps.iterrows():
        val = {c: r[f"step_val_{c.replace(' ', '_')}"] for c in ("head", "centred", "both", "both x head")}
        assert all(0 <= v <= 1 for v in val.values()) and val[r["step_choice"]] == max(val.values())
        if r["step_choice"] != "head":
            assert r[f"step_test_{r['step_choice'].replace(' ', '_')}"] == pytest.approx(r["accuracy"])
    assert folds.loc[folds["arm"] == "relative-tuned", "val_relative"].between(0, 1).all()
    assert folds["val_blend"].between(0, 1).all() and (folds[["val_nll_tuned", "val_nll_untouched"]] >= 0).all().all()
    # the start model untouched scores the same whatever the variant; fit equals the start where it kept it
    untouched = folds[folds["arm"] == "untouched"].pivot_table(index=["fold", "head"], columns="variant",
                                                               values="accuracy")
    assert (untouched["defaults"] == untouched["linear-probe"]).all()
    wide = folds.pivot_table(index=["variant", "fold", "head"], columns="arm", values="accuracy")
    kept = folds[folds["arm"] == "fit"].set_index(["variant", "fold", "head"])["kept"].astype(bool)
    assert (wide.loc[kept[kept].index, "fit"] == wide.loc[kept[kept].index, "untouched"]).all()
    assert (wide.loc[kept[~kept].index, "fit"] == wide.loc[kept[~kept].index, "tuned"]).all()
    # the tie-breaks recomputed from the records: fit's own rule answers exactly what fit answered, and the
    # start's accuracy on every face fit was given (the other folds' test persons) is what fit measured
    tie = script.rules(folds)
    fits = tie[tie["rule"] == script.FIT_RULE].set_index(["variant", "fold", "head"])["gain"]
    assert len(fits) == len(kept) and np.allclose(fits, (wide["fit"] - wide["untouched"]).loc[fits.index])
    recorded = folds[folds["arm"] == "untouched"].set_index(["set", "variant", "head", "fold"])
    wide = recorded.rename(columns={"accuracy": "untouched"})[["untouched", "n"]]
    assert np.allclose(script.start_on_fit_faces(wide), recorded["start_all"])
    assert (folds.loc[folds["arm"] == "tuned", "val_n"] > 0).all()
    text = results.read_text()
    assert "### Fine-tuning study" in text and text.count("| synth |") == 6
    assert script.main(["--summarize", str(csv), "--results", str(results)]) == 0  # a run cut short: its table
    assert results.read_text().count("| synth |") == 12
    # a refit model's validation answers are no evidence: without them the log-loss tie-break is left out
    # (None, as a run's own records hold them before any CSV: an object column)
    refit = folds.assign(val_nll_tuned=folds["val_nll_tuned"].astype(object).where(folds["variant"] != "linear-probe"))
    refit.loc[refit["variant"] == "linear-probe", "val_nll_tuned"] = None
    tie = script.rules(refit).groupby("variant")["rule"].unique()
    assert "log-loss" in tie["defaults"] and "log-loss" not in tie["linear-probe"]
    assert script.FIT_RULE in tie["linear-probe"]
    # fit's rule over several draws of folds (here the same draw twice): every fold result of each, pooled
    assert script.main(["--draws", str(csv), str(csv), "--results", str(results)]) == 0
    drawn, with_relative, with_step = (results.read_text().split("### Fit's defaults over 2 draws")[1]
                                       .split("person-relative step"))
    rows = [r.split(" | ") for r in drawn.splitlines() if r.startswith("| synth |")]
    # fit's person-relative step: expression answered by the classifier where it beat the chosen head on validation
    step = script.rules(folds)
    step = step[step["rule"] == script.RELATIVE_RULE].set_index(["variant", "fold", "head"])
    assert len(step) == 4  # expression, in both variants' two folds
    arms = folds.pivot_table(index=["variant", "fold", "head"], columns="arm", values="accuracy")
    won = folds[folds["arm"] == "relative-tuned"].set_index(["variant", "fold", "head"])["val_relative"]
    evidence = folds[folds["arm"] == "tuned"].set_index(["variant", "fold", "head"])
    for key, r in step.iterrows():
        chosen = evidence.loc[key, "val_untouched"] if kept[key] else evidence.loc[key, "val_tuned"]
        want = arms.loc[key, "relative-tuned-all"] if won[key] > chosen else arms.loc[key, "fit"]
        assert r["gain"] == pytest.approx(want - arms.loc[key, "untouched"])
    assert "| synth | expression |" in with_relative
    step_row = next(r.split(" | ") for r in with_step.splitlines() if r.startswith("| synth | expression |"))
    gain = (steps["accuracy"] - arms.loc[steps.index, "untouched"]).loc["defaults"].mean()
    assert abs(float(step_row[4].split(" ")[0]) - 100 * gain) < 0.051
    chose = with_step.split("What the step chose, per set over every fold result: synth ")[1].split(".")[0]
    counts = {c.rsplit(" ", 1)[0]: int(c.rsplit(" ", 1)[1]) for c in chose.split(", ")}
    assert counts == (steps.loc["defaults", "step_choice"].value_counts() * 2).to_dict()  # the same draw twice
    # ways of choosing among the candidates: fit's choice is the step's accuracy, each "always" its candidate's,
    # hindsight the best of them
    ways = with_step.split("Ways of choosing")[1]
    header = next(r for r in ways.splitlines() if r.startswith("| set |")).strip("| ").split(" | ")
    cells = dict(zip(header, next(r for r in ways.splitlines() if r.startswith("| synth |")).strip("| ").split(" | ")))
    mine = steps.loc["defaults"]
    assert int(cells["fold results"]) == 2 * len(mine)
    assert abs(float(cells["fit's choice"]) - 100 * mine["accuracy"].mean()) < 0.051
    assert abs(float(cells["always head"]) - 100 * fitted.loc["defaults"].loc[mine.index].mean()) < 0.051
    assert abs(float(cells["always centred"]) - 100 * mine["step_test_centred"].mean()) < 0.051
    hindsight = np.maximum(mine[["step_test_centred", "step_test_both", "step_test_both_x_head"]].max(axis=1),
                           fitted.loc["defaults"].loc[mine.index])
    assert abs(float(cells["best on test (hindsight)"]) - 100 * hindsight.mean()) < 0.051
    gains = fits.loc["defaults"].groupby("head").mean()
    assert {r[1] for r in rows} == set(gains.index)
    for r in rows:
        assert int(r[2]) == 2 * len(fits.loc["defaults"].xs(r[1], level="head"))
        assert abs(float(r[4].split(" ")[0]) - 100 * gains[r[1]]) < 0.051


def test_weight_space_average_lies_between_the_two_networks(run_dir):
    import torch

    from facemt.checkpoint import load_checkpoint

    script = _script("finetune")
    start, _, _ = load_checkpoint(run_dir, map_location="cpu")
    tuned, _, _ = load_checkpoint(run_dir, map_location="cpu")
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p))
    a, b = ({k: v.clone() for k, v in m.state_dict().items()} for m in (start, tuned))
    half = script.interpolate(start, tuned, 0.5).state_dict()
    floats = [k for k, v in b.items() if v.is_floating_point()]
    assert floats and all(torch.allclose(half[k], (a[k] + b[k]) / 2) for k in floats)
    assert all(torch.equal(half[k], b[k]) for k in b if k not in floats)  # step counters: the fine-tuned one's
    whole = script.interpolate(start, tuned, 1.0).state_dict()
    assert all(torch.equal(whole[k], b[k]) for k in b)
    none = script.interpolate(start, tuned, 0.0).state_dict()
    assert all(torch.allclose(none[k], a[k]) for k in floats)
    # neither network is changed by averaging them
    assert all(torch.equal(v, b[k]) for k, v in tuned.state_dict().items())
    assert all(torch.equal(v, a[k]) for k, v in start.state_dict().items())


def test_fine_tuning_study_pools_fits_evidence_over_other_validation_groups(faces_dir, run_dir, tmp_path):
    """--evidence: fit run again with other persons validating (disjoint from fit's own and from each other);
    --pooled: fit's two choices made on all that evidence, answered with the fold's recorded test scores."""
    from facemt.config import TrainConfig
    from facemt.data import ImageCache, index_folder

    script = _script("finetune")
    index = index_folder(faces_dir)  # 6 persons: fit validates on 1 of a fold's training persons
    config = TrainConfig(init_from=str(run_dir), epochs=1, batch_size=16, device="cpu")
    train_rows = np.flatnonzero(index.table["person"] != "006")
    rows = pd.DataFrame(script.evidence_fold(index, train_rows, config, ImageCache(), groups=2))
    assert set(rows["group"]) == {1, 2} and (rows["val_n"] > 0).all()
    sub = index.table.iloc[train_rows].reset_index(drop=True)
    own = set(sub["person"].iloc[script.validation_split(sub, config.val_fraction, config.seed)[1]])
    assert rows.groupby("group")["head"].apply(set).tolist() == [{"age_group", "gender", "expression"}] * 2
    expression = rows[rows["head"] == "expression"]
    assert expression["step_n"].notna().all() and expression["step_val_head"].between(0, 1).all()
    assert {f"step_{k}_{c}" for c in script.CANDIDATES for k in ("val", "nll")} <= set(rows.columns)  # as --pooled reads
    groups = [set(p.split()) for p in rows.groupby("group")["persons"].first()]
    assert len(own) == 1 and all(len(g) == 1 for g in groups) and len(own | groups[0] | groups[1]) == 3

    # the pooled decisions, on crafted records: fit's own validation persons tie (the start kept), the other
    # groups favour the fine-tuned head; the step's classifier wins on pooled evidence
    def arm(name, head, acc, **extra):
        return {"set": "s", "variant": "defaults", "fold": 0, "arm": name, "head": head, "accuracy": acc, **extra}

    evidence_of = {"val_tuned": 0.5, "val_untouched": 0.5, "val_n": 4.0}
    step_of = {"step_val_head": 0.5, "step_nll_head": 1.0, "step_val_centred": 0.5, "step_nll_centred": 1.2,
               "step_test_centred": 0.9}
    run = pd.DataFrame([arm("untouched", "gender", 0.6), arm("tuned", "gender", 0.8, **evidence_of),
                        arm("fit", "gender", 0.6, **evidence_of),
                        arm("untouched", "expression", 0.4), arm("tuned", "expression", 0.7, **evidence_of),
                        arm("fit", "expression", 0.4, **evidence_of),
                        arm("step", "expression", 0.4, **evidence_of, **step_of)])
    more = pd.DataFrame([{"set": "s", "fold": 0, "group": 1, "head": "gender", "val_tuned": 1.0,
                          "val_untouched": 0.75, "val_n": 4.0},
                         {"set": "s", "fold": 0, "group": 1, "head": "expression", "val_tuned": 0.75,
                          "val_untouched": 0.5, "val_n": 4.0, "step_n": 4.0, "step_val_head": 0.75,
                          "step_nll_head": 0.9, "step_val_centred": 1.0, "step_nll_centred": 0.5}])
    cells = script.pooled_evidence(run, more).set_index("head")
    assert cells.loc["gender", "own"] == 0.6 and cells.loc["gender", "pooled"] == 0.8  # 6 of 8 > 5 of 8
    assert cells.loc["expression", "pooled"] == 0.9  # centred: 6 of 8 against the tuned head's 5 of 8
    assert script.pooled_evidence(run, more.assign(val_tuned=0.75)).set_index("head").loc["gender", "pooled"] == 0.6
    dropped = script.pooled_evidence(run[run["arm"] != "fit"], more).set_index("head")  # fit's rule recomputed
    assert dropped.loc["gender", "own"] == 0.6 and dropped.loc["gender", "pooled"] == 0.8
    lines = "\n".join(script.evidence_lines(cells.reset_index()))
    assert "| s | gender | 1 | 60.0 | +0.0 | +20.0 | +20.0 | 0 / 0 | - |" in lines
