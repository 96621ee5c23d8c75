"""The whole cost of the out-of-distribution gate at one batch size: its part inside the graph
(the `early_stats` output) and its numpy part, as a share of the model without the gate.

    python benchmarks/gate_cost.py --model liverstage-demo/model.onnx [--batch 16] [--threads 2] [--reps 8]

`liverstage bench` times the numpy part (runtime/ood.py, after the backend) against the model as
exported, which already holds the `early_stats` output. This script also measures what that
output costs inside the graph: the same model with `early_stats` and its nodes cut away
(onnx.utils.Extractor), and the model as exported, on each backend (ONNX Runtime fp32 and int8;
OpenVINO fp32, bf16 and int8 where OpenVINO is installed; the int8 model is X.int8.onnx beside X.onnx).

Two estimates of the in-graph part, because on a shared 2-core machine one model run varies by
more than the whole effect:
  timed     blocks of 10 runs of each model, alternated `--reps` times; the ratio of the medians
            over all runs (and the spread of the per-block ratios)
  profiled  the per-node profiles of both models (ONNX Runtime's profiler, OpenVINO's PERF_COUNT),
            summed by operator kind (with its precision on OpenVINO): the net change of the time
            outside convolutions, the statistics' own nodes and what they change around them
            (a stage kept in float32 for them: its reorders, a pooling that moves from bf16 to
            f32); convolutions are left out, their run-to-run variation is larger than the
            whole effect
The numpy part is timed on the gated model's own outputs for the batch (p50 over the runs), as
`liverstage bench` times it, with the gate's compiled kernels (runtime/_gate_kernels.c) where they
were built, and again with its numpy reference code (the column "numpy code"; the totals use the
kernels in use). The reference for every share is the model without the gate, timed
in the same run. The sessions use the runtime backends' settings (runtime/backends): ONNX Runtime
with `--threads` intra-op threads, no spinning; OpenVINO with the latency hint, `--threads`
inference threads, an explicit precision hint and, under bf16, the backend's tap on the early
stage (backends/openvino.py `tap_early_stage`).

Target (issue 11): the gate's cost <= 5 % of model-only time at batch 16.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from liverstage.runtime.backends import open_backend
from liverstage.runtime.backends.openvino import import_openvino, openvino_installed, tap_early_stage
from liverstage.runtime.bench import percentiles, time_calls
from liverstage.runtime.model_meta import EARLY_STATS_OUTPUT, INPUT_NAME
from liverstage.runtime.ood import OodGate, gate_kernels, use_gate_kernels

BLOCK = 10
CONVOLUTIONS = ("Conv", "QLinearConv", "Convolution", "FusedConv", "NhwcFusedConv")  # the backbone's; not the bf16 tap (GroupConvolution)
# backend -> (file: fp32 or int8, engine, OpenVINO precision hint)
BACKENDS = {
    "onnx": ("fp32", "ort", None), "onnx-int8": ("int8", "ort", None),
    "openvino": ("fp32", "ov", "f32"), "openvino-bf16": ("fp32", "ov", "bf16"), "openvino-int8": ("int8", "ov", "f32"),
}


def without_gate_output(path: Path, folder: Path) -> Path:
    """The model with `early_stats` and every node only it needs removed, saved in `folder`."""
    model = onnx.load(str(path))
    outputs = [o.name for o in model.graph.output if o.name != EARLY_STATS_OUTPUT]
    if len(outputs) == len(model.graph.output):
        raise SystemExit(f"{path}: has no {EARLY_STATS_OUTPUT} output (exported before the gate's early part)")
    cut = onnx.utils.Extractor(model).extract_model([i.name for i in model.graph.input], outputs)
    out = folder / f"{path.stem}.without-{EARLY_STATS_OUTPUT}.onnx"
    onnx.save(cut, str(out))
    return out


class Session:
    """One model on one backend, as the runtime backends configure it, optionally profiling."""

    def __init__(self, path: Path, engine: str, hint: str | None, threads: int, profile: bool) -> None:
        self.engine, self.profile = engine, profile
        if engine == "ort":
            import onnxruntime as ort  # noqa: PLC0415

            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
            if profile:
                options.enable_profiling = True
                options.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"gate-cost-{os.getpid()}")
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.run = lambda x: self._session.run(None, {INPUT_NAME: x})
        else:
            core = import_openvino().Core()  # without its telemetry, as the runtime imports it
            model = core.read_model(str(path))
            if hint == "bf16":
                tap_early_stage(model)  # as the runtime's OpenVINO backend compiles bf16
            config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                      "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": profile}
            self._request = core.compile_model(model, "CPU", config).create_infer_request()
            self._per_kind: list[dict[str, float]] = []

            def run(x):
                self._request.infer({INPUT_NAME: x})
                if profile:
                    kinds: dict[str, float] = collections.defaultdict(float)
                    for info in self._request.profiling_info:
                        kinds[f"{info.node_type} ({info.exec_type})"] += info.real_time.total_seconds() * 1e3
                    self._per_kind.append(kinds)
            self.run = run

    def profile_ms(self, skip: int) -> dict[str, float]:
        """Median time per run of each operator kind (ms), the first `skip` runs left out."""
        if self.engine == "ov":
            runs = self._per_kind[skip:]
            kinds = set().union(*runs)
            return {kind: float(np.median([r.get(kind, 0.0) for r in runs])) for kind in kinds}
        events = json.loads(Path(self._session.end_profiling()).read_text())
        run_ends = sorted(e["ts"] + e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
        start = run_ends[skip - 1] if skip else -1
        runs = len(run_ends) - skip
        totals: dict[str, float] = collections.defaultdict(float)
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > start:
                totals[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
        return dict(totals)


def in_graph_profiled(with_gate: dict[str, float], without: dict[str, float]) -> tuple[float, list[tuple[float, str]]]:
    """The net change of the time outside convolutions (a kind that moves to another precision
    counts its new time and gives back its old); and the changes, largest increase first."""
    deltas = sorted(((with_gate.get(k, 0.0) - without.get(k, 0.0), k) for k in set(with_gate) | set(without)), reverse=True)
    counted = [(d, k) for d, k in deltas if k.split(" ")[0] not in CONVOLUTIONS]
    return sum(d for d, _ in counted), counted


def timed_and_profiled(name: str, models: dict[str, Path], batch: np.ndarray, args) -> tuple[dict, dict]:
    """On backend `name`, the models (label -> path) run alternately in blocks of BLOCK runs,
    `--reps` times: per label, its blocks' times (s), and from a second, profiling pass its
    median time per operator kind (ms; `Session.profile_ms`)."""
    _, engine, hint = BACKENDS[name]
    times: dict[str, list[np.ndarray]] = {}
    profiles: dict[str, dict[str, float]] = {}
    for profile in (False, True):
        sessions = {label: Session(path, engine, hint, args.threads, profile) for label, path in models.items()}
        for session in sessions.values():
            time_calls(lambda: session.run(batch), warmup=3, iters=0)
        blocks: dict[str, list[np.ndarray]] = {label: [] for label in sessions}
        for _ in range(args.reps if not profile else max(2, args.reps // 2)):
            for label, session in sessions.items():
                blocks[label].append(time_calls(lambda: session.run(batch), warmup=0, iters=BLOCK))
        if profile:
            profiles = {label: session.profile_ms(3) for label, session in sessions.items()}
        else:
            times = blocks
    return times, profiles


def timed_share(times: dict[str, list[np.ndarray]], label: str, reference: str) -> tuple[float, list[float]]:
    """How much longer `label` ran than `reference` (the ratio of their medians over all runs, - 1),
    and the range of the per-block ratios."""
    per_block = [np.median(t) / np.median(r) - 1 for t, r in zip(times[label], times[reference])]
    share = float(np.median(np.concatenate(times[label])) / np.median(np.concatenate(times[reference]))) - 1
    return share, [float(min(per_block)), float(max(per_block))]


def measure(name: str, paths: dict[str, Path], stripped: dict[str, Path], batch: np.ndarray, args) -> dict:
    kind = BACKENDS[name][0]
    times, profiles = timed_and_profiled(name, {"gated": paths[kind], "plain": stripped[kind]}, batch, args)
    plain_ms = float(np.median(np.concatenate(times["plain"]))) * 1e3
    share, blocks = timed_share(times, "gated", "plain")
    total, counted = in_graph_profiled(profiles["gated"], profiles["plain"])
    return {"backend": name, "model_ms": plain_ms, "gated_model_ms": float(np.median(np.concatenate(times["gated"]))) * 1e3,
            "in_graph_timed": share, "in_graph_timed_blocks": blocks, "in_graph_profiled": total / plain_ms,
            "in_graph_profiled_ms": total, "in_graph_changes": [[k, round(d, 4)] for d, k in counted]}


def numpy_part_ms(backend, batch: np.ndarray, iters: int) -> dict[str, float]:
    """p50 of the gate's numpy part on this batch's outputs of the gated model (a runtime backend),
    per kind of code: the kernels in use, and the numpy reference code where they are compiled
    (the two alternated in blocks, so both see the same machine load)."""
    gate = OodGate.from_metadata(backend.metadata, source=str(backend.path))
    if gate is None:
        raise SystemExit(f"{backend.path}: carries no out-of-distribution gate")
    outputs = backend.run(batch)
    in_use = gate_kernels()
    kinds = [in_use] + (["numpy"] if in_use == "compiled" else [])
    samples: dict[str, list[float]] = {kind: [] for kind in kinds}
    try:
        for _ in range(5):
            for kind in kinds:
                use_gate_kernels(kind)
                samples[kind] += time_calls(lambda: gate.judge(gate.scores(outputs, batch)), warmup=5, iters=max(1, iters // 5))
    finally:
        use_gate_kernels(in_use)
    return {kind: percentiles(values)["p50"] * 1e3 for kind, values in samples.items()}


def parse_command_line(argv: list[str] | None, description: str) -> tuple[argparse.Namespace, list[str], dict[str, Path]]:
    """The options this script and gate_in_graph.py share: (args, the backends to measure, the
    model path per kind: fp32, int8). Backends that cannot run here are skipped with a line on
    stderr (OpenVINO not installed, no int8 model)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", type=Path, required=True, help="exported fp32 model X.onnx (X.int8.onnx beside it for int8)")
    parser.add_argument("--int8-model", type=Path, default=None, help="the int8 model (default: X.int8.onnx)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"any of {', '.join(BACKENDS)}")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=8, help="alternated blocks of 10 runs per model")
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown or args.batch < 1 or args.threads < 1 or args.reps < 2:
        parser.error(f"unknown backends {unknown}" if unknown else "--batch, --threads must be >= 1 and --reps >= 2")
    if not args.model.is_file():
        parser.error(f"model not found: {args.model}")
    paths = {"fp32": args.model, "int8": args.int8_model or args.model.with_name(args.model.stem + ".int8.onnx")}
    if not openvino_installed():
        skipped = [n for n in names if BACKENDS[n][1] == "ov"]
        names = [n for n in names if BACKENDS[n][1] != "ov"]
        if skipped:
            print(f"skipped {', '.join(skipped)}: OpenVINO is not installed", file=sys.stderr)
    if not paths["int8"].is_file():
        skipped = [n for n in names if BACKENDS[n][0] == "int8"]
        names = [n for n in names if BACKENDS[n][0] != "int8"]
        if skipped:
            print(f"skipped {', '.join(skipped)}: no int8 model {paths['int8']}", file=sys.stderr)
    if not names:
        parser.error("no backend left to measure")
    return args, names, paths


def write_report(args: argparse.Namespace, rows: list[dict]) -> None:
    """The figures as JSON at --json (atomically), if it was given."""
    if args.json is not None:
        from liverstage.runtime.atomic import write_json  # noqa: PLC0415

        write_json(args.json, {"model": str(args.model), "batch": args.batch, "threads": args.threads, "rows": rows})


def main(argv: list[str] | None = None) -> int:
    args, names, paths = parse_command_line(argv, __doc__.split("\n\n")[0])
    needed = sorted({BACKENDS[n][0] for n in names})
    gated = {kind: open_backend(paths[kind], threads=args.threads) for kind in needed}
    size = gated[needed[0]].metadata.preprocess.crop_size
    batch = np.random.default_rng(0).standard_normal((args.batch, 1, size, size)).astype(np.float32)  # as `liverstage bench`
    rows = []
    with tempfile.TemporaryDirectory(prefix="liverstage-gate-cost-") as tmp:
        stripped = {kind: without_gate_output(paths[kind], Path(tmp)) for kind in needed}
        numpy_ms = {kind: numpy_part_ms(gated[kind], batch, 50) for kind in needed}
        print(f"{args.model} ({size} px), batch {args.batch}, {args.threads} threads; shares of the model "
              f"without the gate, timed in this run; the gate's per-batch part runs its {gate_kernels()} code")
        print(f"{'backend':14s} {'model ms':>9s} {'in-graph timed':>22s} {'profiled':>9s} {'numpy':>7s} "
              f"{'total (timed)':>14s} {'total (profiled)':>17s} {'numpy code':>11s}")
        for name in names:
            row = measure(name, paths, stripped, batch, args)
            part = numpy_ms[BACKENDS[name][0]]
            row["gate_kernels"] = gate_kernels()
            row["numpy_part_ms"] = part[gate_kernels()]
            row["numpy_part"] = row["numpy_part_ms"] / row["model_ms"]
            row["numpy_code_part_ms"] = part.get("numpy")
            row["total_timed"] = row["in_graph_timed"] + row["numpy_part"]
            row["total_profiled"] = row["in_graph_profiled"] + row["numpy_part"]
            lo, hi = row["in_graph_timed_blocks"]
            print(f"{name:14s} {row['model_ms']:9.2f} {100 * row['in_graph_timed']:+6.1f} % [{100 * lo:+5.1f},{100 * hi:+5.1f}]"
                  f" {100 * row['in_graph_profiled']:7.1f} % {100 * row['numpy_part']:5.1f} % "
                  f"{100 * row['total_timed']:12.1f} % {100 * row['total_profiled']:15.1f} %"
                  + (f"{100 * row['numpy_code_part_ms'] / row['model_ms']:9.1f} %" if row["numpy_code_part_ms"] else "      n/a"))
            print(f"{'':14s} profiled, largest changes (ms): "
                  + ", ".join(f"{k} {d:+.3f}" for k, d in row["in_graph_changes"][:3] + row["in_graph_changes"][-1:]))
            rows.append(row)
    write_report(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
