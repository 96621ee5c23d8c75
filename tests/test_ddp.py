"""`torchrun --nproc_per_node 2 -m liverstage.train`: DistributedDataParallel on CPU with gloo."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from liverstage.phantoms.synth import synth_cohort
from liverstage.train.checkpoint import read_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    manifest = synth_cohort(tmp_path / "phantoms", patients=15, seed=1, in_plane=64, slices=12)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "liverstage.train", "--manifest", str(manifest), "--out", str(run), "--epochs", "2",
           "--crop-size", "32", "--batch-size", "16", "--device", "cpu", "--loss", "dr-amcl",
           "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "x2 processes" in proc.stdout
    assert proc.stdout.count("epoch 2/2") == 1  # only rank 0 reports
    ckpt = read_checkpoint(run / "model.pt")
    dist = ckpt.distributed
    assert dist["world_size"] == 2
    a, b = dist["param_checksums"]
    assert a == b  # gradients were all-reduced: both ranks hold the same weights
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_patients"] == len(ckpt.splits.test)
    shutil.rmtree(run)
