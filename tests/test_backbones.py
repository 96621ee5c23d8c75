"""Backbone registry, one-channel adaptation, pretrained loading; StagingNet and checkpoints."""

import pytest
import torch
import torchvision

from liverstage.runtime.errors import InputError, ModelError
from liverstage.runtime.spec import PreprocessSpec
from liverstage.train.backbones import build_backbone
from liverstage.train.checkpoint import load_checkpoint, save_checkpoint
from liverstage.train.losses import AngularMarginLoss, SoftmaxHead
from liverstage.train.model import build_model


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet50", 2048), ("vgg16", 4096)])
@pytest.mark.parametrize("size", [32, 64])
def test_trunk_shapes_on_small_crops(name, dim, size):
    trunk = build_backbone(name).eval()
    assert trunk.embedding_dim == dim
    with torch.no_grad():
        out = trunk(torch.randn(2, 1, size, size))
    assert out.shape == (2, dim)
    assert torch.isfinite(out).all()


def test_vgg16_keeps_fc7_and_relu():
    trunk = build_backbone("vgg16")
    kinds = [type(m).__name__ for m in trunk.model.classifier]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU"]
    with torch.no_grad():
        assert (trunk.eval()(torch.randn(2, 1, 32, 32)) >= 0).all()


def test_other_torchvision_model_by_name():
    trunk = build_backbone("mobilenet_v3_small").eval()
    assert trunk(torch.randn(1, 1, 32, 32)).shape == (1, trunk.embedding_dim)


def test_unknown_backbone_is_input_error():
    with pytest.raises(InputError, match="unknown backbone"):
        build_backbone("resnet19")


def test_pretrained_sums_rgb_kernels_and_loads_everything_else(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(reference.state_dict(), path)
    trunk = build_backbone("resnet18", pretrained=path)
    assert trunk.model.conv1.in_channels == 1
    assert torch.allclose(trunk.model.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(trunk.model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    # A grey image through the adapted conv == the same image repeated on RGB through the original.
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(trunk.model.conv1(x), reference.conv1(x.repeat(1, 3, 1, 1)), atol=1e-5)


def test_pretrained_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        build_backbone("resnet18", pretrained=tmp_path / "missing.pth")
    wrong = tmp_path / "vgg.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(ModelError, match="does not match"):
        build_backbone("resnet50", pretrained=wrong)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ModelError):
        build_backbone("resnet18", pretrained=junk)


@pytest.mark.parametrize("loss,head_type", [("softmax", SoftmaxHead), ("asm", AngularMarginLoss),
                                            ("amcl", AngularMarginLoss), ("dr-amcl", AngularMarginLoss)])
def test_build_model_heads(loss, head_type):
    model = build_model("resnet18", loss, scale=20.0, margin=0.4).eval()
    assert isinstance(model.head, head_type)
    assert model.head.weight.shape == (3, 512)
    x = torch.randn(3, 1, 32, 32)
    emb = model(x)
    logits = model.class_logits(emb)
    assert logits.shape == (3, 3)
    if loss != "softmax":
        # Inference logits carry no margin: s * cosine.
        assert torch.allclose(logits, 20.0 * model.cosine(emb), atol=1e-5)
        assert model.margin == (0.0 if loss == "asm" else 0.4)


def _save(tmp_path, model, name="model.pt"):
    return save_checkpoint(tmp_path / name, model, preprocess=PreprocessSpec(crop_size=32),
                           args={"backbone": "resnet18", "out": tmp_path}, manifest=tmp_path / "m.csv",
                           splits={"train": ["p1", "p2"], "val": [], "test": ["p3"]}, epoch=2,
                           metrics={"accuracy": 0.5})


def test_checkpoint_round_trip_weights_only(tmp_path):
    torch.manual_seed(1)
    model = build_model("resnet18", "dr-amcl").eval()
    path = _save(tmp_path, model)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "liverstage-checkpoint" and raw["format_version"] == 1
    assert raw["splits"]["test"] == ["p3"] and raw["class_names"] == ["A", "B", "C"]
    assert raw["embedding_dim"] == 512 and raw["loss"] == "dr-amcl"
    assert PreprocessSpec.from_dict(raw["preprocess"]).crop_size == 32
    loaded, ckpt = load_checkpoint(path)
    assert not loaded.training
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert ckpt.epoch == 2 and ckpt.args["out"] == str(tmp_path)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temporary behind


def test_checkpoint_rejects_foreign_corrupt_and_truncated(tmp_path):
    model = build_model("resnet18", "amcl")
    good = _save(tmp_path, model).read_bytes()
    (tmp_path / "trunc.pt").write_bytes(good[: len(good) // 2])
    torch.save({"state_dict": model.state_dict()}, tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("hello")
    for name in ("trunc.pt", "foreign.pt", "text.pt", "absent.pt"):
        with pytest.raises(ModelError):
            load_checkpoint(tmp_path / name)
