"""`export_checkpoint`: one trained checkpoint -> an ONNX model / TensorRT engine / Triton repository,
with its metadata, a parity report against PyTorch fp32, and a model card.

`export_checkpoint` is a sequence of named steps (cheap checks first, nothing written until
everything is computed):
1. validate options; for --engine trt check TensorRT and a CUDA GPU before anything else;
2. `load_source`: the checkpoint (ModelError if not ours or corrupt);
3. `pick_crops`: real crops (data.export_crops); `calibrated_graph`: the deployed graph with its
   temperature; `model_metadata`: the metadata;
4. `onnx_model`: float32 ONNX, then the FP16 / INT8 model; `check_parity`: it runs with ONNX
   Runtime (CPU) on the crops against PyTorch fp32, fp16 also on large-norm inputs;
5. `finalise` and `write_outputs`: the model, `PATH.parity.json` and the model card, each
   atomically (the Triton repository as one atomic folder), then the TensorRT engine if asked.
Between steps 4 and 5, with nothing on disk yet: `fit_ood_gate` fits and measures the
out-of-distribution gate on the exported model's own outputs (ood_fit), and
`record_openvino_bf16` measures OpenVINO bf16 against fp32. A further check of the exported model
belongs there too: it sees the graph, the crops, the ONNX model, the parity figures and the metadata.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from liverstage.runtime import checks
from liverstage.runtime.atomic import write_bytes, write_json
from liverstage.runtime.errors import InputError
from liverstage.runtime.jsonsafe import json_safe
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
            checks.integer(getattr(self, name), "--" + name.replace("_", "-"), low=1)
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


@dataclasses.dataclass(frozen=True)
class Source:
    """The checkpoint being exported: its network, its typed record and its file's sha256."""

    path: Path
    net: Any  # train.model.StagingNet, in eval mode
    ckpt: Any  # train.checkpoint.Checkpoint
    sha256: str

    @property
    def spec(self):
        return self.ckpt.preprocess

    @property
    def probs_source(self) -> str:
        from .graph import probs_source_for  # noqa: PLC0415

        return probs_source_for(self.ckpt.loss)


@dataclasses.dataclass
class Parity:
    """The exported model against PyTorch fp32 on the parity crops (figures are parity.json's)."""

    session: Any  # onnxruntime.InferenceSession of the exported model (CPU)
    reference: dict[str, Any]  # PyTorch fp32 outputs on crops.parity
    figures: dict[str, Any]
    failures: list[str]


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, options: ExportOptions, *,
                      echo: Callable[[str], None] = print) -> ExportResult:
    """Export `checkpoint` to `out` (see the module docstring). Raises LiverstageError subclasses."""
    options.validate()
    checkpoint, out = Path(checkpoint), Path(out)
    check_out_path(out, options)
    _check_tensorrt_here(options, echo)
    source = load_source(checkpoint, echo)
    crops = pick_crops(source, options, echo)
    graph, temperature_info = calibrated_graph(source, crops, options, echo)
    meta = model_metadata(source, graph, crops, options, temperature_info)
    model = onnx_model(graph, crops, meta, options, echo)
    checked = check_parity(graph, model, crops, meta, options, echo)
    # Checks that add figures or metadata to this export go here: after parity, before any write.
    meta = fit_ood_gate(meta, checked, crops, source, echo)
    meta = record_openvino_bf16(model, meta, checked, crops, options, echo)
    meta, model_bytes, report = finalise(model, meta, checked, source, options)
    return write_outputs(out, options, source, meta, model_bytes, report, checked, crops, echo)


def fit_ood_gate(meta: ModelMetadata, checked: "Parity", crops, source: Source,
                 echo: Callable[[str], None]) -> ModelMetadata:
    """The out-of-distribution gate, fitted on the exported model's own outputs (so an int8 or fp16
    model gets thresholds that fit it) and measured; its figures go into parity.json and the card."""
    from . import ood_fit  # noqa: PLC0415

    gate, checked.figures["ood_gate"] = ood_fit.fit_for_export(checked.session, crops, source.ckpt, source.spec,
                                                               echo=echo)
    return meta.replace(ood=gate)


def record_openvino_bf16(model, meta: ModelMetadata, checked: "Parity", crops, options: ExportOptions,
                         echo: Callable[[str], None]) -> ModelMetadata:
    """An fp32 ONNX export run in OpenVINO bf16 against OpenVINO fp32 on the parity crops, where
    OpenVINO is installed: the record `predict --precision auto` reads before it runs bf16."""
    if options.precision != "fp32" or options.fmt != "onnx" or options.engine != "onnx":
        return meta
    from . import onnx_export  # noqa: PLC0415
    from .openvino_parity import measure_bf16  # noqa: PLC0415

    bf16 = measure_bf16(onnx_export.to_bytes(model), crops.parity.images, crops.parity.labels, echo=echo)
    if not bf16:
        return meta
    checked.figures["openvino_bf16"] = bf16
    return meta.replace(extra={**meta.extra, "openvino_bf16": bf16})


def _check_tensorrt_here(options: ExportOptions, echo: Callable[[str], None]) -> None:
    """For --engine trt: BackendUnavailable (exit code 2) before any work if TensorRT or a GPU is missing."""
    if options.engine != "trt":
        return
    from liverstage.runtime.backends.tensorrt import machine_info  # noqa: PLC0415

    machine = machine_info()
    echo(f"TensorRT {machine['tensorrt_version']} on {machine['gpu_name']} (sm {machine['compute_capability']})")


def load_source(checkpoint: Path, echo: Callable[[str], None]) -> Source:
    from liverstage.train.checkpoint import load_checkpoint  # noqa: PLC0415

    if not checkpoint.is_file():
        raise InputError(f"checkpoint not found: {checkpoint}")
    net, ckpt = load_checkpoint(checkpoint)
    echo(f"checkpoint {checkpoint}: {ckpt.backbone} + {ckpt.loss}, crop {ckpt.preprocess.crop_size} px, "
         f"epoch {ckpt.epoch}")
    return Source(path=checkpoint, net=net, ckpt=ckpt, sha256=file_sha256(checkpoint))


def pick_crops(source: Source, options: ExportOptions, echo: Callable[[str], None]):
    from .data import export_crops  # noqa: PLC0415

    crops = export_crops(source.ckpt, source.spec, calibration_manifest=options.calibration_manifest)
    echo(f"crops: parity {len(crops.parity)} from {crops.parity.source}; "
         f"calibration {len(crops.calibration)} from {crops.calibration.source}"
         + (" (synthetic phantoms, not patients)" if crops.phantoms else ""))
    return crops


def calibrated_graph(source: Source, crops, options: ExportOptions,
                     echo: Callable[[str], None]) -> tuple[Any, dict[str, Any] | None]:
    """The deployed graph with its softmax temperature fitted on labelled validation crops (T = 1
    without them), and the fit's figures."""
    import torch  # noqa: PLC0415

    from . import calibration  # noqa: PLC0415
    from .graph import InferenceGraph, torch_reference  # noqa: PLC0415

    torch.manual_seed(0)
    graph = InferenceGraph(source.net, scale=source.ckpt.scale, probs_source=source.probs_source).eval()
    temperature, info = 1.0, None
    if options.calibrate_temperature and crops.temperature is not None and len(set(crops.temperature.labels)) >= 2:
        logits = calibration.base_logits(graph, torch_reference(graph, crops.temperature.images))
        temperature = calibration.fit_temperature(logits, crops.temperature.labels)
        info = {
            "crops": len(crops.temperature), "source": crops.temperature.source,
            "nll_before": calibration.nll(logits, crops.temperature.labels, 1.0),
            "nll_after": calibration.nll(logits, crops.temperature.labels, temperature),
        }
        echo(f"temperature {temperature:.4g} (NLL {info['nll_before']:.4f} -> "
             f"{info['nll_after']:.4f} on {len(crops.temperature)} crops from {crops.temperature.source})")
        if temperature >= calibration.T_MAX:
            echo("  note: the fit hit its upper bound: on these validation crops the model does no better than "
                 "chance, so its probabilities were flattened (the predicted stages are unchanged)")
    elif options.calibrate_temperature:
        echo("temperature 1 (no labelled validation crops with two or more stages to fit it on)")
    graph = InferenceGraph(source.net, scale=source.ckpt.scale, temperature=temperature,
                           probs_source=source.probs_source).eval()
    return graph, info


def model_metadata(source: Source, graph, crops, options: ExportOptions,
                   temperature_info: dict[str, Any] | None) -> ModelMetadata:
    """The exported model's metadata (its out-of-distribution gate is fitted later, on the exported model)."""
    ckpt = source.ckpt
    extra = {
        "checkpoint_path": str(source.path.resolve()),
        "engine": options.engine,
        "training_versions": dict(ckpt.versions),
        "parity_crops_source": crops.parity.source,
        "parity_crops_are_phantoms": crops.phantoms,
    }
    if temperature_info is not None:
        extra["temperature_fit"] = temperature_info
    return ModelMetadata(
        class_names=ckpt.class_names, preprocess=source.spec, backbone=ckpt.backbone, loss=ckpt.loss,
        scale=ckpt.scale, margin=ckpt.margin, temperature=float(graph.temperature), probs_source=source.probs_source,
        precision=options.precision, embedding_dim=ckpt.embedding_dim,
        checkpoint_sha256=source.sha256, versions=package_versions(EXPORT_PACKAGES), extra=extra,
    )


def onnx_model(graph, crops, meta: ModelMetadata, options: ExportOptions, echo: Callable[[str], None]):
    """float32 ONNX, converted to the asked precision, checked, carrying `meta`."""
    from . import fp16, int8, onnx_export  # noqa: PLC0415

    echo(f"exporting ONNX ({options.precision}) ...")
    model = onnx_export.export_fp32(graph, crop_size=meta.preprocess.crop_size)
    if options.precision == "fp16":
        model = fp16.to_fp16(model)
    elif options.precision == "int8":
        model = int8.to_int8(model, crops.calibration.images)
    onnx_export.check_graph(model)
    onnx_export.set_metadata(model, meta)
    return model


def check_parity(graph, model, crops, meta: ModelMetadata, options: ExportOptions,
                 echo: Callable[[str], None]) -> Parity:
    """Run the exported model with ONNX Runtime (CPU) on the parity crops against PyTorch fp32;
    fp16 also on large-norm inputs. Prints the report."""
    from . import onnx_export, parity  # noqa: PLC0415
    from .graph import torch_reference  # noqa: PLC0415

    session = parity.ort_session(onnx_export.to_bytes(model))
    reference = torch_reference(graph, crops.parity.images)
    figures = parity.compare(reference, parity.run_session(session, crops.parity.images), labels=crops.parity.labels)
    figures["source"] = crops.parity.source
    figures["phantoms"] = crops.phantoms
    figures["runtime"] = "onnxruntime-cpu"
    if options.precision == "fp16":
        figures["large_norm"] = parity.large_norm_check(graph, session, images=crops.parity.images,
                                                       crop_size=meta.preprocess.crop_size)
    failures = parity.check_targets(options.precision, figures)
    figures["targets"] = parity.TARGETS[options.precision]
    figures["targets_met"] = not failures
    echo(parity.format_report(options.precision, figures, failures))
    return Parity(session=session, reference=reference, figures=figures, failures=failures)


def finalise(model, meta: ModelMetadata, checked: Parity, source: Source,
             options: ExportOptions) -> tuple[ModelMetadata, bytes, dict[str, Any]]:
    """The parity summary into the metadata, the model's bytes, and the parity report (JSON-safe)."""
    from . import onnx_export  # noqa: PLC0415

    summary = {k: checked.figures[k] for k in ("n_crops", "max_abs_delta_cosine", "stage_agreement")
               if isinstance(checked.figures.get(k), (int, float))}
    meta = meta.replace(extra={**meta.extra, "parity": json_safe(summary)})
    onnx_export.set_metadata(model, meta)
    report = json_safe({"precision": options.precision, "checkpoint": str(source.path.resolve()),
                        "checkpoint_sha256": source.sha256, "failures": checked.failures, **checked.figures})
    return meta, onnx_export.to_bytes(model), report


def write_outputs(out: Path, options: ExportOptions, source: Source, meta: ModelMetadata, model_bytes: bytes,
                  report: dict[str, Any], checked: Parity, crops, echo: Callable[[str], None]) -> ExportResult:
    """Write the model, `PATH.parity.json` and the model card, each atomically (a Triton repository
    as one atomic folder); for --engine trt build and check the engine too."""
    if options.fmt == "triton":
        result = _write_triton(out, options, source, meta, model_bytes, report, checked.failures)
    elif options.engine == "onnx":
        result = _write_onnx(out, source, meta, model_bytes, report, checked.failures)
    else:
        result = _write_tensorrt(out, options, source, meta, model_bytes, report, checked, crops, echo)
    for path in result.written:
        echo(f"wrote {path}")
    return result


def _card(meta: ModelMetadata, source: Source, model_file: str, report: dict[str, Any], engine: str) -> dict:
    from . import model_card  # noqa: PLC0415

    return model_card.build_card(meta=meta, ckpt=source.ckpt, model_file=model_file, parity=report, engine=engine)


def _write_triton(out: Path, options: ExportOptions, source: Source, meta: ModelMetadata, model_bytes: bytes,
                  report: dict[str, Any], failures: list[str]) -> ExportResult:
    from . import model_card  # noqa: PLC0415
    from .triton import MODEL_FILE, config_pbtxt, write_repository  # noqa: PLC0415

    name = options.model_name or f"liverstage_{meta.backbone}_{meta.loss.replace('-', '_')}_{options.precision}"

    def extras(folder: Path) -> None:
        write_json(folder / (MODEL_FILE + PARITY_SUFFIX), report)
        model_card.write_card(folder, _card(meta, source, f"1/{MODEL_FILE}", report, "triton-onnxruntime"))

    folder = write_repository(out, name, model_bytes=model_bytes, write_extras=extras, config_text=config_pbtxt(
        model_name=name, meta=meta, max_batch_size=options.batch_max,
        preferred_batch_sizes=[options.batch_opt, options.batch_max]))
    model_path, parity_path = folder / "1" / MODEL_FILE, folder / (MODEL_FILE + PARITY_SUFFIX)
    cards = (folder / model_card.CARD_MD, folder / model_card.CARD_JSON)
    return ExportResult(model_path=model_path, parity_path=parity_path, card_paths=cards, parity=report,
                        failures=failures, metadata=meta,
                        written=[model_path, folder / "config.pbtxt", parity_path, *cards])


def _write_onnx(out: Path, source: Source, meta: ModelMetadata, model_bytes: bytes, report: dict[str, Any],
                failures: list[str]) -> ExportResult:
    from . import model_card  # noqa: PLC0415

    write_bytes(out, model_bytes)
    parity_path = out.with_name(out.name + PARITY_SUFFIX)
    write_json(parity_path, report)
    cards = model_card.write_card(out.parent, _card(meta, source, out.name, report, "onnxruntime"))
    return ExportResult(model_path=out, parity_path=parity_path, card_paths=tuple(cards), parity=report,
                        failures=failures, metadata=meta, written=[out, parity_path, *cards])


def _write_tensorrt(out: Path, options: ExportOptions, source: Source, meta: ModelMetadata, model_bytes: bytes,
                    report: dict[str, Any], checked: Parity, crops, echo: Callable[[str], None]) -> ExportResult:
    """The ONNX source beside the engine, then the engine, its own parity figures and the card."""
    from liverstage.runtime.backends.tensorrt import sidecar_path  # noqa: PLC0415

    from . import model_card, parity  # noqa: PLC0415
    from .tensorrt_build import build_and_check  # noqa: PLC0415

    onnx_path = out.with_suffix(".onnx")
    write_bytes(onnx_path, model_bytes)
    echo(f"wrote {onnx_path} (the engine's source; validated with ONNX Runtime above)")
    trt_figures = build_and_check(onnx_path, out, metadata=meta, reference=checked.reference,
                                  images=crops.parity.images, labels=crops.parity.labels, options=options, echo=echo)
    trt_failures = parity.check_targets(options.precision, trt_figures)
    trt_figures["source"] = crops.parity.source
    echo(parity.format_report(options.precision, trt_figures, trt_failures))
    failures = checked.failures + [f"tensorrt: {f}" for f in trt_failures]
    report = json_safe({**report, "failures": failures, "tensorrt": trt_figures})
    parity_path = out.with_name(out.name + PARITY_SUFFIX)
    write_json(parity_path, report)
    cards = model_card.write_card(out.parent, _card(meta, source, out.name, report, "tensorrt"))
    return ExportResult(model_path=out, parity_path=parity_path, card_paths=tuple(cards), parity=report,
                        failures=failures, metadata=meta, written=[onnx_path, out, sidecar_path(out), parity_path, *cards])
