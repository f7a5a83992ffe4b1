import pytest
import torch
from safetensors.torch import save_file

from facemt import FacemtError
from facemt.model import create_model, create_trunk


@pytest.mark.parametrize("tasks,widths", [(None, {"age_group": 3, "gender": 2, "expression": 6}), (("expression",), {"expression": 6})])
def test_forward_gives_one_logit_tensor_per_head(tasks, widths):
    model, pre = create_model("resnet18", tasks, image_size=32)
    out = model(torch.randn(2, 3, 32, 32))
    assert {k: v.shape for k, v in out.items()} == {k: (2, w) for k, w in widths.items()}
    sum(v.sum() for v in out.values()).backward()
    assert model.trunk.conv1.weight.grad is not None
    assert pre.image_size == 32 and pre.mean == (0.485, 0.456, 0.406)


def test_heads_are_sized_from_the_trunk():
    model, _ = create_model("mobilenetv2_100", ("gender",), image_size=32)
    assert model.heads["gender"].in_features == model.trunk.num_features == 1280


def test_unknown_backbone_lists_similar_names():
    with pytest.raises(FacemtError, match="unknown backbone 'resnet18x'.*resnet18"):
        create_model("resnet18x")


def test_pretrained_file_is_loaded(tmp_path):
    source = create_trunk("resnet18")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = create_trunk("resnet18", pretrained_file=path)
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)


def test_bad_pretrained_file(tmp_path):
    with pytest.raises(FacemtError, match="not found"):
        create_trunk("resnet18", pretrained_file=tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not weights")
    with pytest.raises(FacemtError, match="cannot load as resnet18 weights"):
        create_trunk("resnet18", pretrained_file=junk)


def test_offline_hub_fails_with_one_clear_message(monkeypatch, tmp_path):
    # A closed local port stands in for an unreachable hub, online or not.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FacemtError) as info:
        create_trunk("resnet18", pretrained=True)
    msg = str(info.value)
    assert "unreachable" in msg and "--pretrained-file" in msg and "--no-pretrained" in msg and "--pretrained " in msg


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_in_a_pth_file_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state = {k: v for k, v in create_trunk("resnet18").state_dict().items()}
    state["payload"] = _Payload(str(marker))
    torch.save(state, path)
    with pytest.raises(FacemtError, match="cannot load as resnet18 weights"):
        create_trunk("resnet18", pretrained_file=path)
    assert not marker.exists()
