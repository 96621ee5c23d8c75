"""What the worker does to one complete series: decide, stage as `predict` does, write results.

Each step is the one `predict` uses:
- `series_verdict(headers)`: the series rules of runtime/dicom_study.py (staged, or skipped and why).
- `open_model(path, ...)`: the model, opened once per process through backends.choice (predict's options).
- `stage_series` / `write_results`: Predictor on the series folder, then report.json plus the DICOM
  outputs of runtime/dicom_out.py (SR and secondary capture).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from ..atomic import write_json
from ..dicom_study import series_verdict  # noqa: F401  (THE series rules, the same as predict's on a study)
from ..errors import InputError

log = logging.getLogger("liverstage.serve")


def read_headers(paths: Sequence[Path]) -> list:
    """Every instance's header (no pixel data); InputError naming the first unreadable file."""
    import pydicom  # noqa: PLC0415

    headers = []
    for path in paths:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001  (any parse error: the file is unusable)
            raise InputError(f"cannot read stored instance {path.name} ({type(exc).__name__}: {exc})") from None
    return headers


def open_model(model: str | Path, *, backend: str = "auto", precision: str = "auto", device: str = "auto",
               threads: int | None = None, hint: str = "latency") -> tuple[object, dict]:
    """Open the model once for the process, chosen as `predict` chooses it: (backend, the report's `model`)."""
    from ..backends.choice import choose_backend, model_info, validate_choice  # noqa: PLC0415

    validate_choice(backend, precision, device, threads, hint)
    runner = choose_backend(Path(model), backend=backend, precision=precision, device=device, threads=threads,
                            hint=hint)
    return runner, model_info(runner)


def stage_series(predictor, series_dir: Path) -> tuple[dict, object]:
    """Stage the series folder exactly as `liverstage predict DIR` does: (its report, its VolumeResult).

    InputError (one line) if the series cannot be staged.
    """
    from ..report import build_report  # noqa: PLC0415

    run = predictor.run([series_dir])
    if run.errors:
        raise InputError(run.errors[0][1])
    return build_report(run), run.results[0]


def write_results(folder: Path, *, report: dict, result) -> list[Path]:
    """Write the results of one series into `folder` (a fresh temporary folder); the files written.

    report.json (predict's schema), then the Comprehensive 3D SR and the secondary capture that the
    sender passes on to the PACS (runtime/dicom_out.py, the same files as `predict --dicom-out`).
    """
    from ..dicom_out import write_dicom_results  # noqa: PLC0415
    from ..report import summary_picture_rgb  # noqa: PLC0415

    write_json(folder / "report.json", report)
    dicom = write_dicom_results(folder, series_files=result.dicom_files, result=report["results"][0],
                                model=report["model"], picture_rgb=summary_picture_rgb(result))
    return [folder / "report.json", *dicom]
