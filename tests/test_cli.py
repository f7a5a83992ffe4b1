import csv
import io
import json
import shlex

import pandas as pd
import pytest

from facemt.cli import EPILOG, build_parser, main
from facemt.checkpoint import read_config
from conftest import TINY_FIT


def test_fit_writes_a_self_describing_run(run_dir):
    assert {p.name for p in run_dir.iterdir()} == {"model.safetensors", "config.json", "history.csv"}
    cfg = read_config(run_dir)
    assert cfg["backbone"] == "mobilenetv2_100" and cfg["train"]["init_from"] == "base"  # the built-in model
    assert set(cfg["calibration"]["temperature"]) == set(cfg["tasks"])  # fitted on the validation persons
    assert list(cfg["tasks"]) == ["age_group", "gender", "expression"]
    assert cfg["train"]["epochs"] == 2 and cfg["preprocess"]["image_size"] == 32
    assert cfg["dataset"]["images"] == 72 and cfg["dataset"]["persons"] == 6
    assert cfg["split"]["val_persons"] and cfg["split"]["subject_disjoint"]
    history = pd.read_csv(run_dir / "history.csv")
    assert len(history) == 2
    for t in ("age_group", "gender", "expression"):
        assert {f"train_{t}_loss", f"train_{t}_acc", f"val_{t}_loss", f"val_{t}_acc"} <= set(history.columns)


def test_predict_json_all_heads_probabilities_sum_to_one(run_dir, faces_dir, capsys):
    files = sorted(faces_dir.glob("*.jpg"))[:3]
    assert main(["predict", str(run_dir), *map(str, files), "--json", "--device", "cpu", "--no-detect"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in results] == list(map(str, files))
    for r in results:
        for t in ("age_group", "gender", "expression"):
            assert r[t]["label"] in r[t]["probabilities"]
            assert abs(sum(r[t]["probabilities"].values()) - 1) < 1e-5


def test_predict_folder_csv_reports_bad_files_and_exits_nonzero(run_dir, faces_dir, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted(faces_dir.glob("*.jpg"))[:2]
    for g in good:
        (folder / g.name).write_bytes(g.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (folder / "empty.png").write_bytes(b"")
    code = main(["predict", str(run_dir), str(folder), "--csv", "--device", "cpu", "--no-detect"])
    captured = capsys.readouterr()
    assert code == 1
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert len(rows) == 4
    assert sum(1 for r in rows if r["error"]) == 2
    assert all(r["expression"] for r in rows if not r["error"])
    assert "broken.jpg" in captured.err and "empty.png" in captured.err
    assert "Traceback" not in captured.err


def test_predict_table(run_dir, faces_dir, capsys):
    f = sorted(faces_dir.glob("*.jpg"))[0]
    assert main(["predict", str(run_dir), str(f), "--device", "cpu", "--no-detect"]) == 0
    out = capsys.readouterr().out
    assert f.name in out and "expression" in out


@pytest.mark.parametrize(
    "argv,match",
    [
        (["predict", "--model", "/nonexistent/run", "x.jpg"], "no such run folder"),
        (["fit", "--data", "/nonexistent/faces", "--out", "OUT"], "no such folder"),
        (["fit", "--data", "FACES", "--out", "OUT", "--tasks", "race"], "unknown task"),
        (["fit", "--data", "FACES", "--out", "OUT", "--epochs", "0"], "--epochs"),
        (["fit", "--data", "FACES", "--out", "OUT", "--loss-weights", "gender"], "bad loss weight"),
        (["fit", "--data", "FACES", "--out", "OUT", "--backbone", "nonet"], "unknown backbone"),
        (["synth", "OUT", "--persons", "0"], "--persons"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, match, faces_dir, tmp_path, capsys):
    argv = [a.replace("FACES", str(faces_dir)).replace("OUT", str(tmp_path / "o")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and match in err and "\n" not in err


def test_fit_refuses_to_overwrite_a_run(run_dir, faces_dir, capsys):
    before = (run_dir / "model.safetensors").read_bytes()
    assert main(["fit", "--data", str(faces_dir), "--out", str(run_dir), *TINY_FIT]) == 2
    assert "already holds a trained model" in capsys.readouterr().err
    assert (run_dir / "model.safetensors").read_bytes() == before


def test_fit_stops_before_training_on_unreadable_images(faces_dir, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    for g in sorted(faces_dir.glob("*.jpg"))[::3]:
        (folder / g.name).write_bytes(g.read_bytes())
    (folder / "099_y_f_a_a.jpg").write_text("oops")
    assert main(["fit", "--data", str(folder), "--out", str(tmp_path / "r"), *TINY_FIT]) == 2
    err = capsys.readouterr().err
    assert "099_y_f_a_a.jpg" in err and "unreadable" in err
    assert not (tmp_path / "r").exists()


def test_single_task_model_has_one_head(faces_dir, tmp_path, capsys):
    run = tmp_path / "expr"
    assert main(["fit", "--data", str(faces_dir), "--out", str(run), "--tasks", "expression", *TINY_FIT]) == 0
    assert list(read_config(run)["tasks"]) == ["expression"]
    f = sorted(faces_dir.glob("*.jpg"))[0]
    capsys.readouterr()
    assert main(["predict", str(run), str(f), "--json", "--device", "cpu", "--no-detect"]) == 0
    result = json.loads(capsys.readouterr().out)[0]
    assert "expression" in result and "gender" not in result


def test_same_seed_same_metrics(faces_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        assert main(["fit", "--data", str(faces_dir), "--out", str(run), *TINY_FIT, "--augment", "heavy"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(a / "history.csv"), pd.read_csv(b / "history.csv"))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_synth_names_follow_faces(tmp_path):
    assert main(["synth", str(tmp_path / "s"), "--persons", "2", "--width", "40", "--height", "50"]) == 0
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert len(names) == 24 and names[0] == "001_y_m_a_a.jpg" and names[-1] == "002_y_f_s_b.jpg"


def test_help_shows_examples(capsys):
    assert main(["fit", "--help"]) == 0
    assert "facemt fit --data" in capsys.readouterr().out


def test_every_help_example_parses():
    """The examples under --help are commands the parser accepts as written."""
    commands = [shlex.split(line.split("#")[0]) for line in EPILOG.splitlines()[1:] if line.strip()]
    assert len(commands) >= 10 and all(words[0] == "facemt" for words in commands)
    parser = build_parser()
    for words in commands:
        args = parser.parse_args(words[1:])
        assert args.command == words[1], words
        if args.command == "predict":
            assert args.inputs, words


def test_help_imports_no_heavy_module():
    code = ("import sys, contextlib, io\n"
            "from facemt.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    for argv in (['--help'], ['fit', '--help'], ['predict', '--help'], ['cv', '--help']):\n"
            "        assert main(argv) == 0\n"
            "heavy = [m for m in ('torch', 'timm', 'pandas', 'albumentations', 'cv2', 'sklearn') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_without_a_terminal_fit_logs_each_epoch_with_timing(faces_dir, tmp_path, capsys):
    assert main(["fit", "--data", str(faces_dir), "--out", str(tmp_path / "r"), *TINY_FIT,
                 "--person-relative", "off"]) == 0
    assert "person_relative_fit" not in read_config(tmp_path / "r")  # off: not even fitted
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("epoch")]
    assert any("epoch   1/2" in l and "elapsed" in l and "eta" in l for l in lines)
    assert any("epoch   2/2" in l for l in lines)


def test_fit_json_summary(faces_dir, tmp_path, capsys):
    assert main(["fit", "--data", str(faces_dir), "--out", str(tmp_path / "r"), *TINY_FIT, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["best_epoch"] in (1, 2) and set(out["temperatures"]) == set(out["tasks"])
    assert 0 <= out["metrics"]["val_gender_acc"] <= 1
    assert out["person_relative"]["mode"] == "auto" and isinstance(out["person_relative"]["used"], bool)


def test_library_errors_name_fields_and_the_cli_names_options(faces_dir, tmp_path, capsys):
    from facemt.config import TrainConfig
    from facemt.errors import FacemtError

    with pytest.raises(FacemtError, match=r"^backbone_lr_scale must be"):
        TrainConfig(backbone_lr_scale=0).validate()
    assert main(["fit", "--data", str(faces_dir), "--out", str(tmp_path / "o"), "--backbone-lr-scale", "0"]) == 2
    assert "error: --backbone-lr-scale must be" in capsys.readouterr().err


def test_a_head_skipped_for_one_class_is_said_once(faces_dir, tmp_path, capsys, caplog):
    """Women only: fit names the gender head it cannot train once (its data check), and cv once before its
    folds, not again for every model it trains."""
    women = tmp_path / "women"
    women.mkdir()
    for f in faces_dir.glob("*.jpg"):
        if f.name.split("_")[2] == "f":
            (women / f.name).write_bytes(f.read_bytes())
    assert main(["fit", "--data", str(women), "--out", str(tmp_path / "r"), *TINY_FIT]) == 0
    said = [l for l in capsys.readouterr().err.splitlines() if "gender" in l and "two classes" in l]
    said += [r.getMessage() for r in caplog.records if "gender" in r.getMessage()]
    assert len(said) == 1, said
    caplog.clear()
    assert main(["cv", "--data", str(women), "--out", str(tmp_path / "cv"), "--folds", "3", "--no-baselines",
                 "--no-fit-model", *TINY_FIT]) == 0
    said = [l for l in capsys.readouterr().err.splitlines() if "gender" in l and "two classes" in l]
    said += [r.getMessage() for r in caplog.records if "gender" in r.getMessage()]
    assert len(said) == 1, said


def _documented_commands() -> list[str]:
    """Every ``facemt ...`` line inside the code blocks of README.md and the examples' READMEs, continuation
    lines joined, ``&&`` chains split."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    commands = []
    for doc in [root / "README.md", *sorted((root / "examples").glob("*/README.md"))]:
        inside, pending = False, ""
        for line in doc.read_text().splitlines():
            if line.lstrip().startswith("```"):
                inside, pending = not inside, ""
                continue
            line = pending + line.strip()
            pending = line[:-1] + " " if inside and line.endswith("\\") else ""
            if inside and not pending:
                commands += [p.strip() for p in line.split("&&") if p.strip().startswith("facemt ")]
    return commands


def test_every_command_in_the_docs_names_real_options():
    """README's commands parse as written (a synopsis line, with [optional] parts, names only options its
    command has): the docs cannot drift from the parser unnoticed."""
    import argparse
    import re

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    documented = _documented_commands()
    assert len(documented) >= 30
    for line in documented:
        words = shlex.split(line, comments=True)
        sub = commands[words[1]]
        options = set(sub._option_string_actions)
        named = re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line)
        assert set(named) <= options, (line, set(named) - options)
        if " [" in line or "..." in line:
            continue  # a synopsis, not a command
        for op in (">", "|"):
            words = words[:words.index(op)] if op in words else words
        args = parser.parse_args(words[1:])
        assert isinstance(args, argparse.Namespace) and args.command == words[1], line


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_are_drawn_on_a_terminal_only(terminal):
    from rich.console import Console

    from facemt.cli.common import EventProgress

    console = Console(file=io.StringIO(), force_terminal=terminal, color_system=None, width=120)
    row = {"train_gender_acc": 0.5, "val_gender_acc": 0.25}
    with EventProgress(console) as progress:
        progress("decode", {"done": 4, "total": 4})
        progress("epoch_start", {"epochs": 1, "steps": 2})
        for _ in range(2):
            progress("step", {"epoch": 1, "loss": 0.7})
        progress("epoch_end", {"epoch": 1, "epochs": 1, "row": row})
    text = console.file.getvalue()
    assert "train acc gender=0.50  val acc gender=0.25" in text
    # in a log file a bar would come once, at the end, after the epoch lines it belongs before
    assert ("━" in text) == terminal and ("decode images" in text) == terminal
