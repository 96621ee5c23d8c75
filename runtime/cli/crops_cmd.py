"""`liverstage crops`: write the crops a model would see for one volume, as PNG + CSV."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import InputError
from ..spec import PreprocessSpec
from .options import dataclass_options, with_options

CSV_HEADER = "index,file,slice,x0,y0,x1,y1,spacing_x,spacing_y,spacing_z"


SPEC_FILE_HELP = ("PreprocessSpec JSON to start from (e.g. a model's spec.json); "
                  "the preprocessing options override it.")


def spec_from_file(spec_file: Optional[Path]):
    """The PreprocessSpec in `spec_file`, or the default spec when there is none."""
    if spec_file is None:
        return PreprocessSpec()
    if not spec_file.is_file():
        raise InputError(f"spec file not found: {spec_file}")
    try:
        return PreprocessSpec.from_json(spec_file.read_text(encoding="utf-8"))
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read PreprocessSpec from {spec_file}: {exc}") from None


def to_uint8(image, low: float, high: float):
    """Map [low, high] (the spec's clip range) linearly to 0..255."""
    import numpy as np  # noqa: PLC0415

    scaled = (np.asarray(image, dtype=np.float64) - low) / (high - low) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def register(app: typer.Typer) -> None:
    @app.command("crops")
    @with_options(dataclass_options(PreprocessSpec, optional=True))
    def crops_command(
        volume: Path = typer.Argument(..., help="NIfTI volume (.nii / .nii.gz)."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder to write (PNG crops, crops.csv, spec.json); written whole or not at all."),
        mask: Optional[Path] = typer.Option(None, "--mask", help="Liver mask on the same grid (shape and affine) as the volume."),
        mask_label: Optional[int] = typer.Option(None, "--mask-label", help="Label value of the liver in the mask (default: any non-zero voxel)."),
        bbox: Optional[str] = typer.Option(None, "--bbox", help="Liver box x0,y0,z0,x1,y1,z1 in the file's voxel coordinates (half-open)."),
        roi: Optional[str] = typer.Option(None, "--roi", help="'auto': rough liver region heuristic for axial abdominal MRI, no mask needed."),
        frame: Optional[int] = typer.Option(None, "--frame", min=0, help="Frame of a 4D file to use (4D files are refused without it)."),
        spec_file: Optional[Path] = typer.Option(None, "--spec", help=SPEC_FILE_HELP),
        *,
        options: dict,
    ) -> None:
        """Write the normalised liver crops of VOLUME as 8-bit PNG (what the model sees).

        Give the liver region with one of --mask, --bbox or --roi auto. PNG grey levels map the
        spec's clip range (clip_low to clip_high) to 0..255 (so 0..1 of the normalised range is
        the middle half). crops.csv lists each crop's canonical slice and box; spec.json is the
        PreprocessSpec used. Rows run anterior -> posterior, the patient's right on the left.
        """
        import json  # noqa: PLC0415

        from PIL import Image  # noqa: PLC0415

        from ..atomic import atomic_dir  # noqa: PLC0415
        from ..crops import crops_for_volume  # noqa: PLC0415
        from ..roi import parse_bbox  # noqa: PLC0415
        from .synth_cmd import check_replaceable  # noqa: PLC0415

        try:
            spec = spec_from_file(spec_file).replace(**options)
        except ValueError as exc:
            raise InputError(f"bad preprocessing option: {exc}") from None
        box = parse_bbox(bbox) if bbox is not None else None
        check_replaceable(out, marker="crops.csv", what="crops")
        crops = crops_for_volume(volume, spec=spec, mask=mask, mask_label=mask_label, bbox=box, roi=roi, frame=frame)
        if len(crops) == 0:
            raise InputError(f"no slice of {volume} has a liver region large enough for a crop")
        for warning in crops.warnings:
            typer.echo(f"liverstage: warning: {warning}", err=True)
        sx, sy, sz = crops.spacing
        lines = [CSV_HEADER]
        with atomic_dir(out) as tmp:
            for i, (image, z, b) in enumerate(zip(crops.images, crops.slices, crops.boxes)):
                name = f"crop_{i:03d}_z{int(z):03d}.png"
                Image.fromarray(to_uint8(image[0], spec.clip_low, spec.clip_high), mode="L").save(tmp / name)
                lines.append(f"{i},{name},{int(z)},{b[0]},{b[1]},{b[2]},{b[3]},{sx:.6g},{sy:.6g},{sz:.6g}")
            (tmp / "crops.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
            (tmp / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2) + "\n", encoding="utf-8")
        typer.echo(f"wrote {len(crops)} crops of {volume} to {out} (spec {spec.hash})")
