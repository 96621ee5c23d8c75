"""`liverstage serve` latency and throughput, as ratios against in-process staging in the same run.

    python benchmarks/bench_serve.py [--model M.onnx] [--out DIR] [--threads 2] [--quiet 1.0]
                                     [--repeats 5] [--senders 3] [--per-sender 4] [--json F]

1. Latency: one 40-slice, 224-px series sent over DICOM (loopback); the time from the last
   instance received (server clock, recorded before its success status) plus the quiet period
   to the report written and recorded (goal: <= 1 s). Reference: staging the same series
   folder in this process with `Predictor` (what `liverstage predict DIR` does, same threads).
2. Throughput: `--senders` associations at once, each sending `--per-sender` such series one
   after the other; series per minute from the first instance sent to the last series done.
   Reference: series per minute of back-to-back in-process staging.
3. The server's RSS after a warm-up series, after the latency runs and after the throughput run
   (it grows over the first few series while malloc's per-thread arenas and ONNX Runtime's
   arena fill, then stays flat).

Without --model it trains a ResNet18 + AMCL for one epoch on 12 phantoms at crop 224 and exports
it (needs the `train` extra; about a minute on 2 cores). The sender threads run in this process
and share the machine's cores with the server. Series are synthetic phantoms, NOT patients.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SLICES, IN_PLANE = 40, 224


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-c", "import sys; from liverstage.runtime.cli import main; main(sys.argv[1:])",
                    *args], check=True)


def trained_model(folder: Path) -> Path:
    """One epoch of ResNet18 + AMCL at crop 224 on 12 phantoms, exported to ONNX fp32 (cached)."""
    model = folder / "resnet18-224.onnx"
    if model.is_file():
        print(f"reusing {model}", flush=True)
        return model
    from liverstage.phantoms.synth import synth_cohort

    t0 = time.perf_counter()
    synth_cohort(folder / "cohort", patients=12, seed=0, in_plane=224, slices=24)
    cli("train", "--manifest", str(folder / "cohort" / "manifest.csv"), "--out", str(folder / "run"),
        "--backbone", "resnet18", "--crop-size", "224", "--epochs", "1", "--lr", "1e-3", "--no-progress",
        "--overwrite", "--cache-dir", str(folder / "cache"))
    cli("export", str(folder / "run" / "model.pt"), "--engine", "onnx", "--precision", "fp32", "--out", str(model))
    print(f"trained and exported {model.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return model


class SeriesMaker:
    """Fresh-UID 40-slice 224-px phantom series (not patients) written to disk for sending."""

    def __init__(self, folder: Path) -> None:
        import nibabel as nib

        from liverstage.phantoms.synth import synth_patient

        shutil.rmtree(folder, ignore_errors=True)  # series of an earlier run would share folders
        self.folder = folder
        self.volumes = []
        for index in range(3):
            ph = synth_patient(index, seed=0, in_plane=IN_PLANE, slices=int(SLICES * 1.2) + 2)
            img = nib.as_closest_canonical(nib.Nifti1Image(ph.data, ph.affine))
            z0 = (img.shape[2] - SLICES) // 2
            if img.shape[2] < SLICES:
                raise SystemExit(f"phantom {index} has {img.shape[2]} slices, fewer than {SLICES}")
            part = img.slicer[:, :, z0:z0 + SLICES]
            self.volumes.append((part.get_fdata(dtype="float32"), part.affine))
        self.count = 0

    def make(self) -> list[Path]:
        from liverstage.phantoms.dicom import series_from_volume, write_series

        data, affine = self.volumes[self.count % len(self.volumes)]
        self.count += 1
        return write_series(series_from_volume(data, affine), self.folder / f"series{self.count:03d}")


class Server:
    def __init__(self, model: Path, work: Path, log: Path, *, threads: int, quiet: float) -> None:
        self.log = log
        self.handle = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from liverstage.runtime.cli import main; main(sys.argv[1:])",
             "serve", "--model", str(model), "--work", str(work), "--port", "0", "--device", "cpu",
             "--threads", str(threads), "--quiet-seconds", str(quiet)],
            stdout=subprocess.DEVNULL, stderr=self.handle)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())
            if match:
                self.port = int(match.group(1))
                return
            if self.proc.poll() is not None:
                raise SystemExit(f"serve exited:\n{log.read_text()}")
            time.sleep(0.1)
        self.stop()
        raise SystemExit("serve did not start listening within 120 s")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.handle.close()


def wait_done(queue, uids: list[str], timeout: float = 600) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = {r["series_uid"]: r for r in queue.jobs()}
        if all(rows.get(u, {}).get("state") in ("done", "skipped", "failed") for u in uids):
            bad = [u for u in uids if rows[u]["state"] != "done"]
            if bad:
                raise SystemExit(f"series not staged: {[(u, rows[u]['state'], rows[u]['reason']) for u in bad]}")
            return {u: rows[u] for u in uids}
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {len(uids)} series")


def series_uid(paths: list[Path]) -> str:
    import pydicom

    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


def reference_staging(model: Path, folder: Path, threads: int, repeats: int) -> float:
    """Median seconds to stage `folder` in this process, as `liverstage predict DIR` does."""
    from liverstage.runtime.predict import Predictor
    from liverstage.runtime.serve.staging import open_model, stage_series

    backend, info = open_model(model, device="cpu", threads=threads)
    predictor = Predictor(backend, model_info=info)
    stage_series(predictor, folder)  # warm-up; raises if the folder is not one stageable series
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stage_series(predictor, folder)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a 224-px liverstage ONNX model (default: train one)")
    parser.add_argument("--out", type=Path, default=None, help="keep the model, series and work folder here")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="inference threads of the server")
    parser.add_argument("--quiet", type=float, default=1.0, help="the server's --quiet-seconds")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--senders", type=int, default=3)
    parser.add_argument("--per-sender", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from liverstage.runtime.serve.queue import JobQueue
    from liverstage.runtime.serve.sender import Destination, send_files

    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    folder = Path(tmp.name) if tmp else args.out
    folder.mkdir(parents=True, exist_ok=True)
    model = args.model or trained_model(folder)
    maker = SeriesMaker(folder / "series")
    work = folder / f"work-{int(time.time())}"
    figures: dict = {"threads": args.threads, "quiet_seconds": args.quiet, "slices": SLICES, "in_plane": IN_PLANE}

    print(f"\n[reference] in-process staging of one {SLICES}-slice {IN_PLANE}-px series (predict's code path)")
    ref_paths = maker.make()
    ref = reference_staging(model, ref_paths[0].parent, args.threads, args.repeats)
    figures["reference_staging_s"] = ref
    print(f"  {ref:.3f} s per series (median of {args.repeats})")

    server = Server(model, work, folder / "serve.log", threads=args.threads, quiet=args.quiet)
    try:
        queue = JobQueue(work, create=False)
        dest = Destination("LIVERSTAGE", "127.0.0.1", server.port)

        print(f"\n[1] latency after the quiet period ({args.quiet:g} s), one series at a time")
        after_quiet, waits, staging = [], [], []
        for r in range(args.repeats + 1):
            paths = maker.make()
            send_files(paths, dest, calling_ae="BENCH")
            row = wait_done(queue, [series_uid(paths)])[series_uid(paths)]
            if r == 0:
                rss_warm = server.rss_mb()
                continue  # warm-up
            due = row["last_received"] + args.quiet
            after_quiet.append(row["finished_at"] - due)
            waits.append(row["started_at"] - due)
            staging.append(row["finished_at"] - row["started_at"])
        rss_latency = server.rss_mb()
        lat = statistics.median(after_quiet)
        figures.update(latency_after_quiet_s=lat, latency_after_quiet_all_s=after_quiet,
                       start_delay_s=statistics.median(waits), server_staging_s=statistics.median(staging))
        print(f"  last instance + quiet -> report recorded: median {lat:.3f} s (all: "
              f"{', '.join(f'{v:.3f}' for v in after_quiet)})   goal <= 1 s")
        print(f"  of which: start delay {statistics.median(waits) * 1e3:.1f} ms, staging "
              f"{statistics.median(staging):.3f} s; vs in-process staging {lat / ref:.2f}x")

        print(f"\n[2] throughput: {args.senders} associations at once, {args.per_sender} series each")
        batches = [[maker.make() for _ in range(args.per_sender)] for _ in range(args.senders)]
        uids = [series_uid(p) for b in batches for p in b]
        errors: list[str] = []

        def run(batch):
            try:
                for paths in batch:
                    send_files(paths, dest, calling_ae="BENCH")
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

        threads = [threading.Thread(target=run, args=(b,)) for b in batches]
        t_start = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_sent = time.time()
        if errors:
            raise SystemExit(f"sending failed: {errors}")
        rows = wait_done(queue, uids)
        t_end = max(r["finished_at"] for r in rows.values())
        per_min = len(uids) / (t_end - t_start) * 60
        ref_per_min = 60 / ref
        instances = len(uids) * SLICES
        figures.update(series_per_minute=per_min, reference_series_per_minute=ref_per_min,
                       receive_instances_per_s=instances / (t_sent - t_start))
        print(f"  {len(uids)} series ({instances} instances) in {t_end - t_start:.1f} s: {per_min:.1f} series/min "
              f"({per_min / ref_per_min:.2f}x of back-to-back in-process staging, {ref_per_min:.1f}/min); "
              f"received {instances / (t_sent - t_start):.0f} instances/s while sending")
        rss_end = server.rss_mb()
        figures.update(rss_warm_mb=rss_warm, rss_after_latency_mb=rss_latency, rss_end_mb=rss_end)
        print(f"\n[3] server RSS: {rss_warm:.0f} MB after the warm-up series, {rss_latency:.0f} MB after "
              f"{args.repeats} more (allocator and ONNX Runtime arenas warming up), {rss_end:.0f} MB after "
              f"the {len(uids)} of [2] ({rss_end - rss_latency:+.0f} MB)")
        queue.close()
    finally:
        server.stop()

    if args.json:
        from liverstage.runtime.atomic import write_json

        write_json(args.json, figures)
        print(f"\nwrote {args.json}")
    if tmp:
        tmp.cleanup()
    print("\nSeries are synthetic phantoms, not patients; timings depend on this machine and its load.")


if __name__ == "__main__":
    main()
