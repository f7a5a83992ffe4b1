import numpy as np
import pytest
import torch

from facemt import FacemtError
from facemt.losses import MultiTaskLoss, parse_loss_weights


def test_rows_without_label_give_zero_gradient_to_that_head():
    logits = {"gender": torch.randn(4, 2, requires_grad=True), "expression": torch.randn(4, 6, requires_grad=True)}
    targets = {"gender": torch.tensor([0, -1, 1, -1]), "expression": torch.tensor([-1, 2, -1, -1])}
    total, per_task = MultiTaskLoss({"gender": 1.0, "expression": 1.0})(logits, targets)
    total.backward()
    g, e = logits["gender"].grad, logits["expression"].grad
    assert torch.all(g[[1, 3]] == 0) and torch.any(g[[0, 2]] != 0)
    assert torch.all(e[[0, 2, 3]] == 0) and torch.any(e[1] != 0)


def test_head_without_any_label_contributes_nothing():
    logits = {"gender": torch.randn(3, 2, requires_grad=True)}
    total, per_task = MultiTaskLoss({"gender": 1.0})(logits, {"gender": torch.tensor([-1, -1, -1])})
    assert total.item() == 0.0 and torch.isfinite(total)
    total.backward()
    assert torch.all(logits["gender"].grad == 0)


def test_weights_scale_the_sum():
    logits = {"gender": torch.randn(2, 2), "expression": torch.randn(2, 6)}
    targets = {"gender": torch.tensor([0, 1]), "expression": torch.tensor([1, 2])}
    total, per = MultiTaskLoss({"gender": 1.0, "expression": 2.0})(logits, targets)
    assert torch.isclose(total, per["gender"] + 2 * per["expression"])


def test_parse_loss_weights():
    tasks = ("age_group", "gender", "expression")
    assert parse_loss_weights("expression=2, gender=0.5", tasks) == {"age_group": 1.0, "gender": 0.5, "expression": 2.0}
    for bad in ("expression", "expression=x", "race=1", "gender=-1"):
        with pytest.raises(FacemtError):
            parse_loss_weights(bad, tasks)
    with pytest.raises(FacemtError, match="not among the trained"):
        parse_loss_weights("gender=1", ("expression",))


def test_jitter_consistency_loss_is_zero_for_the_same_view_and_trains_only_the_moved_one():
    import torch

    from facemt.engine import jitter_consistency_loss, jitter_views

    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32)
    moved = jitter_views(images)
    assert moved.shape == images.shape
    assert 0 < (moved - images).abs().mean() < 0.2  # a few pixels, not another picture
    logits = {"gender": torch.randn(4, 2, requires_grad=True), "expression": torch.randn(4, 6, requires_grad=True)}
    same = jitter_consistency_loss(logits, {t: v.clone() for t, v in logits.items()})
    assert float(same.detach()) == pytest.approx(0, abs=1e-6)
    other = {t: torch.randn_like(v, requires_grad=True) for t, v in logits.items()}
    loss = jitter_consistency_loss(logits, other)
    loss.backward()
    assert float(loss.detach()) > 0 and logits["gender"].grad is None and other["gender"].grad is not None


def test_fit_with_jitter_consistency_records_it_and_trains_differently(faces_dir, run_dir, tmp_path):
    import json

    from safetensors.numpy import load_file

    from conftest import TINY_FIT
    from facemt.cli import main

    run = tmp_path / "consistent"
    assert main(["fit", "--data", str(faces_dir), "--out", str(run), *TINY_FIT, "--jitter-consistency", "1"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["jitter_consistency"] == 1.0
    a, b = load_file(run / "model.safetensors"), load_file(run_dir / "model.safetensors")
    assert any(not np.allclose(a[k], b[k]) for k in a.keys() & b.keys())
    assert main(["fit", "--data", str(faces_dir), "--out", str(tmp_path / "x"), *TINY_FIT,
                 "--jitter-consistency", "-1"]) == 2


def test_mix_batch_blends_or_pastes_each_face_with_a_partner_at_the_share_it_returns():
    from facemt.engine import mix_batch

    torch.manual_seed(1)
    images = torch.rand(6, 3, 20, 20)
    mixed, order, share = mix_batch(images, 0.4, 0.0)
    assert 0.5 <= share <= 1 and sorted(order.tolist()) == list(range(6))
    assert torch.allclose(mixed, share * images + (1 - share) * images[order], atol=1e-6)
    for seed in range(5):
        torch.manual_seed(seed)
        pasted, order, share = mix_batch(images, 0.0, 1.0)
        own = (pasted == images).all(1)  # pixels where all channels are the face's own
        partner = (pasted == images[order]).all(1)
        assert bool((own | partner).all())  # nothing blended: every pixel from one face or the other
        moved = order != torch.arange(6)
        assert 0.5 <= share <= 1
        assert own[moved].float().mean().item() == pytest.approx(share, abs=1e-6)
    kinds = set()
    for seed in range(12):  # both on: mixup or cutmix per batch
        torch.manual_seed(seed)
        out, order, share = mix_batch(images, 0.4, 1.0)
        kinds.add(bool(((out == images) | (out == images[order])).all()))
    assert kinds == {True, False}


def test_fit_with_mixup_and_cutmix_records_them_and_trains_differently(faces_dir, run_dir, tmp_path):
    import json

    from safetensors.numpy import load_file

    from conftest import TINY_FIT
    from facemt.cli import main

    run = tmp_path / "mixed"
    assert main(["fit", "--data", str(faces_dir), "--out", str(run), *TINY_FIT, "--mixup", "0.4", "--cutmix", "1"]) == 0
    train = json.loads((run / "config.json").read_text())["train"]
    assert (train["mixup"], train["cutmix"]) == (0.4, 1.0)
    a, b = load_file(run / "model.safetensors"), load_file(run_dir / "model.safetensors")
    assert any(not np.allclose(a[k], b[k]) for k in a.keys() & b.keys())
    assert main(["fit", "--data", str(faces_dir), "--out", str(tmp_path / "x"), *TINY_FIT, "--mixup", "-1"]) == 2


def test_mixup_is_on_when_fine_tuning_a_facemt_model_and_off_from_scratch(faces_dir, tmp_path):
    import json

    from conftest import TINY_FIT
    from facemt.cli import main
    from facemt.config import FINE_TUNE_MIXUP, TrainConfig

    runs = {"tuned": [], "scratch": ["--no-pretrained"]}
    for name, extra in runs.items():
        assert main(["fit", "--data", str(faces_dir), "--out", str(tmp_path / name), *TINY_FIT, "--epochs", "1",
                     *extra]) == 0
    mixup = {name: json.loads((tmp_path / name / "config.json").read_text())["train"]["mixup"] for name in runs}
    assert mixup == {"tuned": FINE_TUNE_MIXUP, "scratch": 0.0}
    assert TrainConfig.from_dict({"epochs": 3}).mixup == 0.0  # a run written before mixup existed resumes without


def test_distillation_loss_is_zero_on_the_start_answers_and_trains_only_the_student():
    from facemt.engine import distillation_loss

    torch.manual_seed(0)
    logits = {"gender": torch.randn(4, 2, requires_grad=True), "expression": torch.randn(4, 6, requires_grad=True)}
    same = distillation_loss(logits, {t: v.detach().clone() for t, v in logits.items()})
    assert float(same.detach()) == pytest.approx(0, abs=1e-6)
    start = {"gender": torch.randn(4, 2, requires_grad=True), "age_group": torch.randn(4, 3)}  # no expression head
    loss = distillation_loss(logits, start)
    loss.backward()
    assert float(loss.detach()) > 0
    assert logits["gender"].grad is not None and start["gender"].grad is None
    assert logits["expression"].grad is None  # a head the start model lacks is not held
    assert float(distillation_loss({"expression": logits["expression"]}, start)) == 0.0


def _raw_probabilities(run, faces_dir) -> dict[str, np.ndarray]:
    """Every face's class probabilities from ``run`` at temperature 1 (a run's fitted temperatures differ)."""
    from facemt.checkpoint import load_checkpoint
    from facemt.data import ImageCache, index_folder
    from facemt.engine import val_probabilities

    model, preprocess, _ = load_checkpoint(run)
    model.temperatures = {t: 1.0 for t in model.tasks}
    return val_probabilities(model, preprocess, index_folder(faces_dir), ImageCache(), "cpu")


def _moved(run, start, faces_dir) -> float:
    a, b = _raw_probabilities(run, faces_dir), _raw_probabilities(start, faces_dir)
    return float(sum(np.abs(a[t] - b[t]).mean() for t in b))


def test_freeze_norm_keeps_the_start_statistics(faces_dir, run_dir, tmp_path):
    import json

    from conftest import TINY_FIT
    from facemt.cli import main

    still = [*TINY_FIT, "--epochs", "1", "--lr", "1e-9", "--init-from", str(run_dir), "--no-keep-start"]  # weights stay
    for name, extra in (("updated", []), ("frozen", ["--freeze-norm"])):
        assert main(["fit", "--data", str(faces_dir), "--out", str(tmp_path / name), *still, *extra]) == 0
    assert json.loads((tmp_path / "frozen" / "config.json").read_text())["train"]["freeze_norm"] is True
    assert _moved(tmp_path / "frozen", run_dir, faces_dir) < 1e-4
    assert _moved(tmp_path / "updated", run_dir, faces_dir) > 0.01  # the batches re-estimated the statistics


def test_fit_with_distill_stays_nearer_the_start_model(faces_dir, run_dir, tmp_path):
    import json

    from conftest import TINY_FIT
    from facemt.cli import main

    fast = [*TINY_FIT, "--epochs", "3", "--backbone-lr-scale", "1", "--init-from", str(run_dir), "--no-keep-start",
            "--freeze-norm"]
    for name, weight in (("free", "0"), ("held", "30")):
        assert main(["fit", "--data", str(faces_dir), "--out", str(tmp_path / name), *fast, "--distill", weight]) == 0
    assert json.loads((tmp_path / "held" / "config.json").read_text())["train"]["distill"] == 30.0
    held, free = _moved(tmp_path / "held", run_dir, faces_dir), _moved(tmp_path / "free", run_dir, faces_dir)
    assert held < 0.85 * free  # without the loss both runs would be the same run


@pytest.mark.parametrize("extra", [["--no-pretrained"], ["--image-size", "40", "--init-from", "RUN"],
                                   ["--distill", "-1"]])
def test_fit_distill_without_a_start_model_it_can_follow_exits_2(faces_dir, run_dir, tmp_path, capsys, extra):
    from conftest import TINY_FIT
    from facemt.cli import main

    extra = [str(run_dir) if e == "RUN" else e for e in extra]
    args = ["fit", "--data", str(faces_dir), "--out", str(tmp_path / "x"), *TINY_FIT, "--distill", "1", *extra]
    assert main(args) == 2
    assert "distill" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
