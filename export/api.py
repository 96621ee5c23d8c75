"""`export_checkpoint`: one trained checkpoint -> an ONNX model / TensorRT engine / Triton repository,
with its metadata, a parity report against PyTorch fp32, and a model card.

Order of work (cheap checks first, nothing written until everything is computed):
1. validate options; for --engine trt check TensorRT and a CUDA GPU before anything else;
2. load the checkpoint (ModelError if not ours or corrupt);
3. pick real crops (data.export_crops), fit the temperature;
4. export float32 ONNX, derive the FP16 / INT8 model, run it with ONNX Runtime (CPU) on the
   crops and compare with PyTorch fp32 (parity), fp16 also on large-norm inputs; fit and
   measure the out-of-distribution gate on that model's outputs (ood_fit);
5. write the model, `PATH.parity.json` and the model card, each atomically (the Triton
   repository as one atomic folder), then build the TensorRT engine if asked.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable

from liverstage.runtime.atomic import write_bytes, write_json
from liverstage.runtime.errors import InputError
from liverstage.runtime.provenance import file_sha256, package_versions
from liverstage.runtime.model_meta import PRECISIONS, ModelMetadata

ENGINES = ("onnx", "trt")
FORMATS = ("onnx", "triton")
PARITY_SUFFIX = ".parity.json"


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    engine: str = "onnx"
    precision: str = "fp32"
    batch_min: int = 1
    batch_opt: int = 16
    batch_max: int = 64
    calibration_manifest: Path | None = None
    fmt: str = "onnx"
    calibrate_temperature: bool = True
    model_name: str | None = None

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise InputError(f"unknown engine {self.engine!r} (expected one of {', '.join(ENGINES)})")
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r} (expected one of {', '.join(PRECISIONS)})")
        if self.fmt not in FORMATS:
            raise InputError(f"unknown format {self.fmt!r} (expected one of {', '.join(FORMATS)})")
        for name in ("batch_min", "batch_opt", "batch_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.batch_min > self.batch_opt:
            raise InputError(f"--batch-min {self.batch_min} is larger than --batch-opt {self.batch_opt}")
        if self.batch_opt > self.batch_max:
            raise InputError(f"--batch-opt {self.batch_opt} is larger than --batch-max {self.batch_max}")
        if self.fmt == "triton" and self.engine != "onnx":
            raise InputError("--format triton writes an ONNX Runtime model repository; use it with --engine onnx")
        if self.calibration_manifest is not None and not Path(self.calibration_manifest).is_file():
            raise InputError(f"calibration manifest not found: {self.calibration_manifest}")
        if self.model_name is not None:
            from .triton import valid_model_name  # noqa: PLC0415

            if not valid_model_name(self.model_name):
                raise InputError(f"invalid model name {self.model_name!r} (letters, digits, - _ . only)")


@dataclasses.dataclass
class ExportResult:
    model_path: Path  # the .onnx / .engine / Triton model.onnx
    parity_path: Path
    card_paths: tuple[Path, Path]
    parity: dict[str, Any]
    failures: list[str]
    metadata: ModelMetadata
    written: list[Path]


def check_out_path(out: Path, options: ExportOptions) -> None:
    """--out must say what it will hold: X.onnx, X.engine, or a folder for a Triton repository."""
    if options.fmt == "triton":
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} exists and is not a folder (a Triton model repository is a folder)")
        return
    want = ".engine" if options.engine == "trt" else ".onnx"
    if out.suffix != want:
        raise InputError(f"--out {out} must end with {want} for --engine {options.engine}")
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give a file name ending with {want}")


EXPORT_PACKAGES = ("liverstage", "torch", "torchvision", "onnx", "onnxscript", "onnxruntime", "numpy")


def json_safe(value: Any) -> Any:
    """Non-finite floats -> strings, so the parity JSON stays strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, options: ExportOptions, *,
                      echo: Callable[[str], None] = print) -> ExportResult:
    """Export `checkpoint` to `out` (see the module docstring). Raises LiverstageError subclasses."""
    options.validate()
    checkpoint, out = Path(checkpoint), Path(out)
    check_out_path(out, options)
    if options.engine == "trt":
        from liverstage.runtime.backends.tensorrt import machine_info  # noqa: PLC0415

        machine = machine_info()  # BackendUnavailable (exit code 2) before any work
        echo(f"TensorRT {machine['tensorrt_version']} on {machine['gpu_name']} (sm {machine['compute_capability']})")

    import torch  # noqa: PLC0415

    from liverstage.train.checkpoint import checkpoint_spec, load_checkpoint  # noqa: PLC0415

    from . import calibration, data, fp16, int8, model_card, ood_fit, onnx_export, parity  # noqa: PLC0415
    from .graph import InferenceGraph, probs_source_for, torch_reference  # noqa: PLC0415

    if not checkpoint.is_file():
        raise InputError(f"checkpoint not found: {checkpoint}")
    net, ckpt = load_checkpoint(checkpoint)
    spec = checkpoint_spec(ckpt)
    checkpoint_sha = file_sha256(checkpoint)
    loss = ckpt["loss"]
    probs_source = probs_source_for(loss)
    echo(f"checkpoint {checkpoint}: {ckpt['backbone']} + {loss}, crop {spec.crop_size} px, epoch {ckpt.get('epoch')}")

    crops = data.export_crops(ckpt, spec, calibration_manifest=options.calibration_manifest)
    echo(f"crops: parity {len(crops.parity)} from {crops.parity.source}; "
         f"calibration {len(crops.calibration)} from {crops.calibration.source}"
         + (" (synthetic phantoms, not patients)" if crops.phantoms else ""))

    torch.manual_seed(0)
    graph = InferenceGraph(net, scale=float(ckpt["scale"]), probs_source=probs_source).eval()
    temperature, temperature_info = 1.0, None
    if options.calibrate_temperature and crops.temperature is not None and len(set(crops.temperature.labels)) >= 2:
        ref_t = torch_reference(graph, crops.temperature.images)
        logits = calibration.base_logits(graph, ref_t)
        temperature = calibration.fit_temperature(logits, crops.temperature.labels)
        temperature_info = {
            "crops": len(crops.temperature), "source": crops.temperature.source,
            "nll_before": calibration.nll(logits, crops.temperature.labels, 1.0),
            "nll_after": calibration.nll(logits, crops.temperature.labels, temperature),
        }
        echo(f"temperature {temperature:.4g} (NLL {temperature_info['nll_before']:.4f} -> "
             f"{temperature_info['nll_after']:.4f} on {len(crops.temperature)} crops from {crops.temperature.source})")
        if temperature >= calibration.T_MAX:
            echo("  note: the fit hit its upper bound: on these validation crops the model does no better than "
                 "chance, so its probabilities were flattened (the predicted stages are unchanged)")
    elif options.calibrate_temperature:
        echo("temperature 1 (no labelled validation crops with two or more stages to fit it on)")
    graph = InferenceGraph(net, scale=float(ckpt["scale"]), temperature=temperature, probs_source=probs_source).eval()

    extra = {
        "checkpoint_path": str(checkpoint.resolve()),
        "engine": options.engine,
        "training_versions": {str(k): str(v) for k, v in (ckpt.get("versions") or {}).items()},
        "parity_crops_source": crops.parity.source,
        "parity_crops_are_phantoms": crops.phantoms,
    }
    if temperature_info is not None:
        extra["temperature_fit"] = temperature_info
    meta = ModelMetadata(
        class_names=tuple(ckpt["class_names"]), preprocess=spec, backbone=str(ckpt["backbone"]), loss=str(loss),
        scale=float(ckpt["scale"]), margin=float(ckpt["margin"]), temperature=float(temperature),
        probs_source=probs_source, precision=options.precision, embedding_dim=int(ckpt["embedding_dim"]),
        checkpoint_sha256=checkpoint_sha, versions=package_versions(EXPORT_PACKAGES), extra=extra,
    )

    echo(f"exporting ONNX ({options.precision}) ...")
    model = onnx_export.export_fp32(graph, crop_size=spec.crop_size)
    if options.precision == "fp16":
        model = fp16.to_fp16(model)
    elif options.precision == "int8":
        model = int8.to_int8(model, crops.calibration.images)
    onnx_export.check_graph(model)
    onnx_export.set_metadata(model, meta)
    session = parity.ort_session(onnx_export.to_bytes(model))
    reference = torch_reference(graph, crops.parity.images)
    figures = parity.compare(reference, parity.run_session(session, crops.parity.images), labels=crops.parity.labels)
    figures["source"] = crops.parity.source
    figures["phantoms"] = crops.phantoms
    figures["runtime"] = "onnxruntime-cpu"
    if options.precision == "fp16":
        figures["large_norm"] = parity.large_norm_check(graph, session, images=crops.parity.images,
                                                       crop_size=spec.crop_size)
    failures = parity.check_targets(options.precision, figures)
    figures["targets"] = parity.TARGETS[options.precision]
    figures["targets_met"] = not failures
    echo(parity.format_report(options.precision, figures, failures))
    gate, figures["ood_gate"] = ood_fit.fit_for_export(session, crops, ckpt, spec, echo=echo)
    meta = meta.replace(ood=gate, extra={**meta.extra, "parity": {k: figures[k] for k in (
        "n_crops", "max_abs_delta_cosine", "stage_agreement") if isinstance(figures.get(k), (int, float))}})
    onnx_export.set_metadata(model, meta)
    model_bytes = onnx_export.to_bytes(model)
    report = json_safe({"precision": options.precision, "checkpoint": str(checkpoint.resolve()),
                        "checkpoint_sha256": checkpoint_sha, "failures": failures, **figures})

    written: list[Path] = []
    if options.fmt == "triton":
        from .triton import MODEL_FILE, config_pbtxt, write_repository  # noqa: PLC0415

        name = options.model_name or f"liverstage_{meta.backbone}_{meta.loss.replace('-', '_')}_{options.precision}"

        def extras(folder: Path) -> None:
            write_json(folder / (MODEL_FILE + PARITY_SUFFIX), report)
            card = model_card.build_card(meta=meta, ckpt=ckpt, model_file=f"1/{MODEL_FILE}", parity=report,
                                         engine="triton-onnxruntime")
            model_card.write_card(folder, card)

        folder = write_repository(out, name, model_bytes=model_bytes, write_extras=extras, config_text=config_pbtxt(
            model_name=name, meta=meta, max_batch_size=options.batch_max,
            preferred_batch_sizes=[options.batch_opt, options.batch_max]))
        model_path = folder / "1" / MODEL_FILE
        parity_path = folder / (MODEL_FILE + PARITY_SUFFIX)
        cards = (folder / model_card.CARD_MD, folder / model_card.CARD_JSON)
        written = [model_path, folder / "config.pbtxt", parity_path, *cards]
    elif options.engine == "onnx":
        write_bytes(out, model_bytes)
        parity_path = out.with_name(out.name + PARITY_SUFFIX)
        write_json(parity_path, report)
        card = model_card.build_card(meta=meta, ckpt=ckpt, model_file=out.name, parity=report, engine="onnxruntime")
        cards = model_card.write_card(out.parent, card)
        model_path = out
        written = [out, parity_path, *cards]
    else:
        from .tensorrt_build import build_and_check  # noqa: PLC0415

        onnx_path = out.with_suffix(".onnx")
        write_bytes(onnx_path, model_bytes)
        echo(f"wrote {onnx_path} (the engine's source; validated with ONNX Runtime above)")
        trt_figures = build_and_check(onnx_path, out, metadata=meta, reference=reference,
                                      images=crops.parity.images, labels=crops.parity.labels,
                                      options=options, echo=echo)
        trt_failures = parity.check_targets(options.precision, trt_figures)
        trt_figures["source"] = crops.parity.source
        echo(parity.format_report(options.precision, trt_figures, trt_failures))
        failures = failures + [f"tensorrt: {f}" for f in trt_failures]
        report = json_safe({**report, "failures": failures, "tensorrt": trt_figures})
        parity_path = out.with_name(out.name + PARITY_SUFFIX)
        write_json(parity_path, report)
        card = model_card.build_card(meta=meta, ckpt=ckpt, model_file=out.name, parity=report, engine="tensorrt")
        cards = model_card.write_card(out.parent, card)
        model_path = out
        from liverstage.runtime.backends.tensorrt import sidecar_path  # noqa: PLC0415

        written = [onnx_path, out, sidecar_path(out), parity_path, *cards]
    for path in written:
        echo(f"wrote {path}")
    return ExportResult(model_path=model_path, parity_path=parity_path, card_paths=tuple(cards), parity=report,
                        failures=failures, metadata=meta, written=written)
