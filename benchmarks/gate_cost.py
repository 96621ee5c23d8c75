"""The out-of-distribution gate's cost as `liverstage bench` measures it, with the gate's compiled
kernels and with its numpy reference code, alternated in the same run.

    python benchmarks/gate_cost.py --model liverstage-demo/model.onnx [--batch 16] [--threads 2] [--rounds 2] [--json F]

The gate (runtime/ood.py, format 3) runs after the backend, on the model's `embedding` output and
the crops; nothing of it is inside the graph, so `liverstage bench`'s "OOD gate" column (the gate's
p50 on a batch's outputs against the model's p50, in the same run) is its whole cost. That column
depends on whether pip built the compiled kernels (runtime/_gate_kernels.c) at install: this
script runs `liverstage bench`'s measurement (runtime/bench.py `run_bench`) `--rounds` times with
each code in turn, so both see the same machine load, and prints per backend the model's time and
the gate's, both ways. Random crops (seed 0), as `liverstage bench`; the gate's reason for them
is built too (they are not liver), which a volume needs once, not per batch.

Target (issue 11): the gate's cost <= 5 % of model-only time at batch 16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from liverstage.runtime.bench import BenchConfig, run_bench
from liverstage.runtime.ood import gate_kernels, use_gate_kernels

BACKENDS = ("onnx", "onnx-int8", "openvino", "openvino-bf16", "openvino-int8")
TARGET = 0.05


def measure(model: Path, *, backends: tuple[str, ...], batch: int, threads: int, iters: int, rounds: int) -> dict:
    """{backend: {"model_ms": [...], code: {"gate_ms": [...], "share": [...]}}} per code that can run
    here ("compiled" where the kernels were built, and "numpy"), and {backend: reason} skipped."""
    codes = ["compiled", "numpy"] if gate_kernels() == "compiled" else ["numpy"]
    measured: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    in_use = gate_kernels()
    try:
        for _ in range(rounds):
            for code in codes:
                use_gate_kernels(code)
                config = BenchConfig(model=model, backends=backends, batch_sizes=(batch,), iters=iters, threads=threads)
                for row in run_bench(config)["results"]:
                    if row.get("skipped"):
                        skipped[row["backend"]] = row["skipped"]
                        continue
                    if row.get("ood_gate_ms") is None:
                        raise SystemExit(f"{model}: carries no out-of-distribution gate")
                    entry = measured.setdefault(row["backend"], {"model_ms": []})
                    entry["model_ms"].append(row["p50_ms"])
                    gate = entry.setdefault(code, {"gate_ms": [], "share": []})
                    gate["gate_ms"].append(row["ood_gate_ms"])
                    gate["share"].append(row["ood_gate_fraction"])
    finally:
        use_gate_kernels(in_use)
    return {"codes": codes, "backends": measured, "skipped": skipped}


def _span(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    low, high = min(values) * scale, max(values) * scale
    return f"{low:.{digits}f}" if round(low, digits) == round(high, digits) else f"{low:.{digits}f}-{high:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="exported fp32 model X.onnx (X.int8.onnx beside it for int8)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"any of {', '.join(BACKENDS)}")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=40, help="timed runs per backend, code and round")
    parser.add_argument("--rounds", type=int, default=2, help="times each code is measured, alternated")
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    if not backends or any(b not in BACKENDS for b in backends):
        parser.error(f"--backends: choose from {', '.join(BACKENDS)}")
    if args.batch < 1 or args.threads < 1 or args.iters < 1 or args.rounds < 1:
        parser.error("--batch, --threads, --iters and --rounds must be positive")
    figures = measure(args.model, backends=backends, batch=args.batch, threads=args.threads, iters=args.iters,
                      rounds=args.rounds)
    for backend, reason in figures["skipped"].items():
        print(f"{backend}: skipped ({reason})", file=sys.stderr)
    print(f"{args.model}, batch {args.batch}, {args.threads} threads, {args.rounds} round(s); the gate's time as a share "
          f"of the model's, each measured in the same run (target <= {TARGET:.0%})")
    header = f"{'backend':<14} {'model ms':>13}"
    for code in figures["codes"]:
        header += f"  {code + ' gate ms':>20} {'share':>13}"
    print(header)
    for backend, entry in figures["backends"].items():
        line = f"{backend:<14} {_span(entry['model_ms']):>13}"
        for code in figures["codes"]:
            line += f"  {_span(entry[code]['gate_ms'], digits=3):>20} {_span(entry[code]['share'], 100) + ' %':>13}"
        print(line)
    if args.json is not None:
        from liverstage.runtime.atomic import write_json  # noqa: PLC0415

        write_json(args.json, {"model": str(args.model), "batch": args.batch, "threads": args.threads,
                               "rounds": args.rounds, "target": TARGET, **figures})
    return 0


if __name__ == "__main__":
    sys.exit(main())
