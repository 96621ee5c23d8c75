"""`liverstage train`: train a staging network (softmax / ASM / AMCL / DR-AMCL) on a manifest.

Its options are generated from liverstage.train.config.RunConfig (training options and every
PreprocessSpec field, under the names `liverstage crops` uses). torch is imported inside the
command body only (the runtime must work without it). Under `torchrun --nproc_per_node N` the same
command (or `python -m liverstage.train`) trains with DistributedDataParallel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from liverstage.train.config import RunConfig

from .options import dataclass_options, with_options
from .crops_cmd import SPEC_FILE_HELP, spec_from_file


def register(app: typer.Typer) -> None:
    @app.command("train")
    @with_options(dataclass_options(RunConfig))
    def train_command(
        test_patients: Optional[Path] = typer.Option(None, "--test-patients", help="File with the test patient ids, one per line (else a split by --test-fraction)."),
        spec_file: Optional[Path] = typer.Option(None, "--spec", help=SPEC_FILE_HELP),
        *,
        options: dict,
    ) -> None:
        """Train a fibrosis staging model (80/20 patient split; test metrics at the end)."""
        from liverstage.train.evaluate import read_patient_list  # noqa: PLC0415
        from liverstage.train.trainer import train_run  # noqa: PLC0415

        if test_patients is not None:
            options["test_patients"] = read_patient_list(test_patients)
        train_run(RunConfig.from_options(options, preprocess=spec_from_file(spec_file)))
