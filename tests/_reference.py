"""The stored fixed-seed reference run: phantoms -> `liverstage train` -> metrics, on the CPU.

`make_run(folder)` writes a small phantom cohort and trains a tiny model through the console
entry point, the interface that refactors must not change; `summarise(folder)` turns the files
into the figures that are compared bit for bit with tests/data/reference_run.json (and
tests/data/reference_predictions.csv). Regenerate both only when a change of results is meant:

    python tests/_reference.py --write
"""

from __future__ import annotations

import hashlib
import json
import sys
import zlib
from pathlib import Path

DATA = Path(__file__).with_name("data")
REFERENCE_JSON = DATA / "reference_run.json"
REFERENCE_PREDICTIONS = DATA / "reference_predictions.csv"
# Every field of the reference run's model.pt but its weights, as the code of checkpoint
# format_version 1 wrote it: later readers must still load such a file.
CHECKPOINT_V1_FIELDS = DATA / "checkpoint_v1_fields.json"

SYNTH_ARGV = ["--patients", "15", "--seed", "0", "--in-plane", "64", "--slices", "12", "--quiet"]
# AMCL with a two-epoch ASM warm-up and validation patients: the warm-up switch, validation,
# best-epoch selection and the test pass all take part.
TRAIN_ARGV = ["--backbone", "resnet18", "--loss", "amcl", "--epochs", "8", "--warmup-epochs", "2",
              "--val-fraction", "0.2", "--lr", "1e-3", "--batch-size", "16", "--crop-size", "48",
              "--seed", "0", "--device", "cpu", "--no-progress",
              "--percentile-inset", "0"]  # the preprocessing the stored reference was made with (before the inset)
TIMING_COLUMNS = ("seconds", "crops_per_second")


def cpu_vendor() -> str:
    """The CPU's vendor (/proc/cpuinfo `vendor_id`), or 'unknown'. Training's float32 kernels
    (MKL, oneDNN) take other code paths on AMD than on Intel CPUs: the same torch gave other
    metrics on an AMD EPYC than the reference made on an Intel Xeon."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def versions() -> dict[str, str]:
    """What the figures' numerics depend on: phantoms (numpy, nibabel, zlib), training (torch, the CPU's vendor)."""
    import nibabel  # noqa: PLC0415
    import numpy  # noqa: PLC0415
    import torch  # noqa: PLC0415

    return {"numpy": numpy.__version__, "nibabel": nibabel.__version__, "zlib": zlib.ZLIB_RUNTIME_VERSION,
            "torch": torch.__version__, "cpu": cpu_vendor()}


def _cli(argv: list[str]) -> None:
    from liverstage.runtime.cli import main  # noqa: PLC0415

    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"liverstage {argv[0]} exited with {exc.code}") from None


def make_run(folder: Path) -> Path:
    """Write the cohort to folder/cohort and the run to folder/run; return folder."""
    _cli(["synth", folder / "cohort", *SYNTH_ARGV])
    _cli(["train", "--manifest", folder / "cohort" / "manifest.csv", "--out", folder / "run",
          "--cache-dir", folder / "cache", *TRAIN_ARGV])
    return folder


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights_sha256(checkpoint: Path) -> str:
    """sha256 over the final model's tensors (sorted names, raw bytes): the weights, nothing else."""
    import torch  # noqa: PLC0415

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def checkpoint_fields(checkpoint: Path) -> dict:
    """The checkpoint dict without its tensors (state_dict)."""
    import torch  # noqa: PLC0415

    fields = torch.load(checkpoint, map_location="cpu", weights_only=True)
    fields.pop("state_dict")
    return fields


def history_without_timings(path: Path) -> list[dict[str, str]]:
    import csv  # noqa: PLC0415

    with path.open(newline="") as fh:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(fh)]


def summarise(folder: Path) -> dict:
    cohort, run = folder / "cohort", folder / "run"
    return {
        "versions": versions(),
        "synth_argv": SYNTH_ARGV,
        "train_argv": TRAIN_ARGV,
        "phantom_sha256": {str(p.relative_to(cohort)): file_sha256(p)
                           for p in sorted(cohort.rglob("*")) if p.is_file()},
        "metrics": json.loads((run / "metrics.json").read_text()),
        "history": history_without_timings(run / "history.csv"),
        "weights_sha256": weights_sha256(run / "model.pt"),
    }


def main(argv: list[str]) -> int:
    import tempfile  # noqa: PLC0415

    if argv != ["--write"]:
        print(__doc__)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_run(Path(tmp))
        summary = summarise(folder)
        DATA.mkdir(exist_ok=True)
        REFERENCE_JSON.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        REFERENCE_PREDICTIONS.write_bytes((folder / "run" / "predictions.csv").read_bytes())
        CHECKPOINT_V1_FIELDS.write_text(json.dumps(checkpoint_fields(folder / "run" / "model.pt"), indent=2) + "\n")
    print(f"wrote {REFERENCE_JSON}, {REFERENCE_PREDICTIONS} and {CHECKPOINT_V1_FIELDS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
