"""The typed checkpoint: files of format_version 1 (as the code of that version wrote them) load,
round-trip field for field, and anything else is one ModelError line naming the file."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from liverstage.runtime.errors import ModelError  # noqa: E402
from liverstage.runtime.spec import LEGACY_DEFAULTS, PreprocessSpec  # noqa: E402
from liverstage.train.checkpoint import Checkpoint, load_checkpoint, read_checkpoint  # noqa: E402
from liverstage.train.model import build_model  # noqa: E402


@pytest.fixture(scope="module")
def v1_file(reference, tmp_path_factory):
    """The reference run's model.pt fields (stored as written by format_version 1) with fresh weights."""
    fields = json.loads(reference.CHECKPOINT_V1_FIELDS.read_text())
    torch.manual_seed(0)
    net = build_model(fields["backbone"], fields["loss"], scale=fields["scale"], margin=fields["margin"])
    path = tmp_path_factory.mktemp("v1") / "model.pt"
    torch.save({**fields, "state_dict": net.state_dict()}, path)
    return path, fields, net


def test_a_version_1_file_loads_with_every_field(v1_file):
    path, fields, net = v1_file
    ckpt = read_checkpoint(path)
    assert ckpt.preprocess == PreprocessSpec.from_dict(fields["preprocess"])
    assert ckpt.splits.test == tuple(fields["splits"]["test"]) and ckpt.epoch == fields["epoch"]
    assert ckpt.metrics == fields["metrics"] and ckpt.distributed == fields["distributed"]
    assert ckpt.args == fields["args"] and ckpt.versions == fields["versions"]
    on_disk = torch.load(path, weights_only=True)
    again = ckpt.to_dict()
    assert set(again) == set(on_disk)
    # Written again, the spec states the fields added since version 1 with their legacy values.
    assert again["preprocess"] == {**on_disk["preprocess"], **LEGACY_DEFAULTS}
    assert PreprocessSpec.from_dict(again["preprocess"]).percentile_inset == 0
    assert ({k: v for k, v in again.items() if k not in ("state_dict", "preprocess")}
            == {k: v for k, v in on_disk.items() if k not in ("state_dict", "preprocess")})
    model, _ = load_checkpoint(path)
    x = torch.rand(2, 1, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x), net.eval()(x))


def test_what_the_trainer_writes_for_resume_round_trips(v1_file, tmp_path):
    path, fields, net = v1_file
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    net.loss(net(torch.rand(4, 1, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    last = Checkpoint.of_model(net, preprocess=PreprocessSpec(crop_size=32), args=fields["args"],
                               splits=fields["splits"], manifest=None, epoch=3, optimizer=optimizer.state_dict(),
                               history=({"epoch": 1, "train_loss": 1.5},), best={"epoch": 1, "val_accuracy": 0.5})
    from liverstage.train.checkpoint import write_checkpoint

    back = read_checkpoint(write_checkpoint(tmp_path / "last.pt", last))
    assert back.history == last.history and back.best == last.best and back.epoch == 3 and back.manifest == ""
    saved, now = back.optimizer["state"], optimizer.state_dict()["state"]
    assert set(saved) == set(now) and saved
    assert all(saved[k]["exp_avg"].equal(now[k]["exp_avg"]) for k in now)
    torch.optim.Adam(net.parameters(), lr=1e-3).load_state_dict(back.optimizer)


@pytest.mark.parametrize("change,needle", [
    ({"format_version": 2}, "format_version 2 is not supported"),
    ({"format": "something-else"}, "is not a liverstage checkpoint"),
    ({"loss": "arcface"}, "unknown loss"),
    ({"class_names": ["F0", "F1", "F2"]}, "class names"),
    ({"preprocess": {"crop_size": 3}}, "crop_size"),
    ({"state_dict": {"w": [1, 2]}}, "dict of tensors"),
    ({"embedding_dim": None}, "damaged"),
])
def test_a_foreign_newer_or_damaged_file_is_one_model_error(v1_file, tmp_path, change, needle):
    path, fields, net = v1_file
    bad = tmp_path / "bad.pt"
    torch.save({**fields, "state_dict": net.state_dict(), **change}, bad)
    with pytest.raises(ModelError) as exc:
        load_checkpoint(bad)
    message = str(exc.value)
    assert needle in message and str(bad) in message and "\n" not in message


def test_weights_of_another_network_are_one_model_error(v1_file, tmp_path):
    path, fields, _ = v1_file
    bad = tmp_path / "other.pt"
    torch.save({**fields, "state_dict": build_model("resnet50", "amcl").state_dict()}, bad)
    read_checkpoint(bad)  # the file itself is well formed
    with pytest.raises(ModelError, match="damaged liverstage checkpoint"):
        load_checkpoint(bad)
    del fields["loss"]
    torch.save(fields, bad)
    with pytest.raises(ModelError, match="KeyError"):
        read_checkpoint(bad)
