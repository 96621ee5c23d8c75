"""`liverstage serve` on loopback: real DICOM associations (pynetdicom, dcmtk), real phantom series.

In-process tests share one running node (module fixture); the crash and shutdown tests run
`liverstage serve` as a child process and kill it. Every network peer is 127.0.0.1, every wait
is bounded in time, and every server is stopped or killed in a `finally`.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
pynetdicom = pytest.importorskip("pynetdicom")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless, generate_uid  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402

from liverstage.phantoms.dicom import series_from_volume, write_series  # noqa: E402
from liverstage.phantoms.synth import synth_patient  # noqa: E402
from liverstage.runtime.errors import InputError  # noqa: E402
from liverstage.runtime.provenance import file_sha256  # noqa: E402
from liverstage.runtime.serve import sender as sender_module  # noqa: E402
from liverstage.runtime.serve import worker as worker_module  # noqa: E402
from liverstage.runtime.serve.queue import FINAL_STATES, JobQueue  # noqa: E402
from liverstage.runtime.serve.scp import STATUS_BAD_UID, STATUS_CANNOT_DECODE, tcp_nodelay  # noqa: E402
from liverstage.runtime.serve.sender import Destination  # noqa: E402
from liverstage.runtime.serve.service import ServeConfig, Service  # noqa: E402
from liverstage.runtime.stages import STAGES  # noqa: E402

QUIET = 0.4
TIMEOUT = 30.0
DICOMDIR_STUDY = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892003"


def dcmtk_tool(name: str) -> str | None:
    """The dcmtk program `name` on PATH (pynetdicom installs Python apps with the same names)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which(name, path=folder)
        if candidate is None:
            continue
        try:
            version = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if "dcmtk" in version.lower():
            return candidate
    return None


STORESCU, STORESCP = dcmtk_tool("storescu"), dcmtk_tool("storescp")
NEEDS_DCMTK = pytest.mark.skipif(STORESCU is None or STORESCP is None,
                                 reason="dcmtk's storescu/storescp are not installed (apt-get install dcmtk)")


# -- helpers ------------------------------------------------------------------------------------
def wait_for(predicate, what: str, timeout: float = TIMEOUT, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_VOLUMES = {}


def phantom_series(index: int = 0, *, slices: int = 16, **kwargs) -> list:
    """A fresh (new UIDs every call) 64-px axial phantom series: one pydicom Dataset per slice."""
    if (index, slices) not in _VOLUMES:
        ph = synth_patient(index, in_plane=64, slices=slices)
        _VOLUMES[(index, slices)] = (ph.data, ph.affine)
    data, affine = _VOLUMES[(index, slices)]
    return series_from_volume(data, affine, study_uid=kwargs.pop("study_uid", None) or generate_uid(), **kwargs)


def associate(port: int, *, calling: str = "TESTSCU", called: str = "LIVERSTAGE", syntaxes=(ExplicitVRLittleEndian,)):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(MRImageStorage, list(syntaxes))
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    return ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=[(evt.EVT_CONN_OPEN, tcp_nodelay)])


def send(port: int, datasets, **kwargs) -> list[int]:
    """C-STORE every dataset (or file path) in one association; their status codes."""
    assoc = associate(port, **kwargs)
    assert assoc.is_established, "association was not accepted"
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def job(queue: JobQueue, series_uid: str) -> dict | None:
    return next((j for j in queue.jobs() if j["series_uid"] == series_uid), None)


def final(queue: JobQueue, series_uid: str):
    row = job(queue, series_uid)
    return row if row is not None and row["state"] in FINAL_STATES else None


def terminal_events(queue: JobQueue, series_uid: str) -> list[str]:
    return [e["event"] for e in queue.events(series_uid) if e["event"] in FINAL_STATES]


def dicomdir_series() -> dict[str, list[Path]]:
    """The real MR study of pydicom's test data: localizers, 3-plane pilots, a derived projection."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(DICOMDIR_STUDY.glob("*/*")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        groups.setdefault(str(ds.SeriesInstanceUID), []).append(path)
    return groups


# -- one in-process node for the network tests ----------------------------------------------------
@pytest.fixture(scope="module")
def node(tmp_path_factory, tiny_model):
    work = tmp_path_factory.mktemp("serve") / "work"
    service = Service(ServeConfig(model=tiny_model, work=work, port=0, allow_ae=("TESTSCU", "STORESCU"),
                                  quiet_seconds=QUIET, device="cpu"))
    service.start()
    try:
        yield service
    finally:
        service.stop()


def test_study_with_distractors_one_report_and_reasons(node, tiny_model, tmp_path, run_cli):
    phantom = phantom_series(0)
    distractors = dicomdir_series()
    files = [p for paths in distractors.values() for p in paths]
    mixed = [item for pair in zip(phantom, files) for item in pair] + phantom[len(files):] + files[len(phantom):]
    statuses = send(node.port, mixed)  # interleaved, as a scanner or PACS sends a study
    assert statuses == [0] * len(statuses)

    uid = str(phantom[0].SeriesInstanceUID)
    done = wait_for(lambda: final(node.queue, uid), "the phantom series to finish")
    assert done["state"] == "done" and done["instances"] == len(phantom) and done["stage"] in STAGES
    skipped = {s: wait_for(lambda s=s: final(node.queue, s), f"series {s}") for s in distractors}
    reasons = {s: row["reason"] for s, row in skipped.items()}
    assert all(row["state"] == "skipped" for row in skipped.values()), reasons
    by_folder = {distractors[s][0].parent.name: r for s, r in reasons.items()}
    assert "localizer" in by_folder["MR1"]
    assert "DERIVED" in by_folder["MR700"]
    assert any("PILOT" in r for r in reasons.values())  # the 3-plane pilots, by their description
    for s in [uid, *distractors]:
        assert len(terminal_events(node.queue, s)) == 1

    # One report, for the phantom only, with predict's schema and predict's numbers.
    results = node.queue.work_dir / "results"
    assert sorted(p.name for p in results.iterdir()) == [uid]
    report = json.loads((results / uid / "report.json").read_text())
    assert report["model"]["sha256"] == file_sha256(tiny_model) and report["errors"] == []
    series_dir = tmp_path / "series"
    write_series(phantom, series_dir)
    code, _, err = run_cli(["predict", series_dir, "--model", tiny_model, "--device", "cpu",
                            "--report", tmp_path / "predict.json", "--quiet"])
    assert code == 0, err
    expected = json.loads((tmp_path / "predict.json").read_text())["results"][0]
    got = report["results"][0]
    for key in ("stage", "probabilities", "uncertain", "crops", "warnings"):
        assert got[key] == expected[key], key

    code, out, err = run_cli(["jobs", "--work", node.queue.work_dir, "--json"])
    assert code == 0, err
    listed = {j["series_uid"]: j for j in json.loads(out)["jobs"]}
    assert listed[uid]["state"] == "done" and listed[uid]["stage"] == done["stage"]
    assert listed[uid]["description"] == "AX T1 LIVER PHANTOM" and listed[uid]["finished"]
    assert all(listed[s]["reason"] == reasons[s] for s in distractors)
    code, out, _ = run_cli(["jobs", "--work", node.queue.work_dir])
    assert code == 0 and uid in out and "skipped" in out


def test_one_server_per_work_folder(node, tiny_model):
    second = Service(ServeConfig(model=tiny_model, work=node.queue.work_dir, port=0, device="cpu"))
    with pytest.raises(InputError, match="another liverstage serve is using this work folder"):
        second.start()


def test_untrusted_or_misaddressed_associations_rejected(node):
    intruder = associate(node.port, calling="INTRUDER")
    assert intruder.is_rejected
    wrong_called = associate(node.port, called="SOMEONEELSE")
    assert wrong_called.is_rejected
    assoc = associate(node.port)
    try:
        assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_malicious_uids_cannot_escape_the_work_folder(node):
    work = node.queue.work_dir
    before = {p for p in work.parent.rglob("*")}
    bad = []
    for sop, series in [("../../x", None), (None, "../../y"), ("1.2/../../z", None), (None, "1.2.3/../../w")]:
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        if sop:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        if series:
            ds.SeriesInstanceUID = series
        bad.append(ds)
    assert send(node.port, bad) == [STATUS_BAD_UID] * len(bad)
    after = {p for p in work.parent.rglob("*")}
    created = {p for p in after - before if not p.name.startswith("queue.sqlite")}
    assert created == set()
    assert not any(node.queue.has_instance(str(ds.SOPInstanceUID)) for ds in bad)


def test_truncated_dataset_and_aborted_association_do_not_stop_the_service(node, monkeypatch):
    series = phantom_series(1)
    uid = str(series[0].SeriesInstanceUID)
    # Raw file bytes as they are on disk: the dataset ends inside its pixel data.
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    statuses = send(node.port, [*series[:5], get_testdata_file("MR_truncated.dcm"), *series[5:9]])
    assert statuses == [0] * 5 + [STATUS_CANNOT_DECODE] + [0] * 4
    assert not node.queue.has_instance(str(pydicom.dcmread(get_testdata_file("MR_truncated.dcm")).SOPInstanceUID))
    # An association that ends abruptly mid-series; the rest comes on a new one.
    assoc = associate(node.port)
    assert int(assoc.send_c_store(series[9]).Status) == 0
    assoc.abort()
    assert send(node.port, series[10:]) == [0] * len(series[10:])
    done = wait_for(lambda: final(node.queue, uid), "the series sent around the bad instance")
    assert done["state"] == "done" and done["instances"] == len(series)


def test_late_instance_reopens_duplicate_changes_nothing(node):
    series = phantom_series(2)
    uid = str(series[0].SeriesInstanceUID)
    assert send(node.port, series[:-1]) == [0] * (len(series) - 1)
    first = wait_for(lambda: final(node.queue, uid), "the first run")
    assert first["state"] == "done" and first["runs"] == 1
    assert send(node.port, series[:1]) == [0]  # already stored: acknowledged, ignored
    time.sleep(2 * QUIET)
    assert job(node.queue, uid)["state"] == "done" and job(node.queue, uid)["runs"] == 1
    report = node.queue.work_dir / "results" / uid / "report.json"
    crops_before = len(json.loads(report.read_text())["results"][0]["crops"])
    assert send(node.port, series[-1:]) == [0]  # the missing slice arrives late: staged again
    again = wait_for(lambda: (r := job(node.queue, uid)) and r["runs"] == 2 and r["state"] in FINAL_STATES and r,
                     "the second run")
    assert again["state"] == "done" and again["instances"] == len(series)
    assert [e["event"] for e in node.queue.events(uid)].count("reopened") == 1
    assert terminal_events(node.queue, uid) == ["done", "done"]
    assert len(json.loads(report.read_text())["results"][0]["crops"]) >= crops_before


@NEEDS_DCMTK
def test_dcmtk_storescu_sends_rle_series(node, tmp_path):
    series = phantom_series(3, transfer_syntax=RLELossless)
    paths = write_series(series, tmp_path / "rle")
    proc = subprocess.run([STORESCU, "--propose-rle", "-aet", "STORESCU", "-aec", "LIVERSTAGE", "127.0.0.1", str(node.port),
                           *map(str, paths)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    uid = str(series[0].SeriesInstanceUID)
    done = wait_for(lambda: final(node.queue, uid), "the RLE series")
    assert done["state"] == "done" and done["calling_ae"] == "STORESCU" and done["instances"] == len(series)
    stored = pydicom.dcmread(node.queue.instance_paths(uid)[0], stop_before_pixels=True)
    assert stored.file_meta.TransferSyntaxUID == RLELossless


@NEEDS_DCMTK
def test_results_sent_to_dcmtk_storescp_with_retries(tmp_path, tiny_model, monkeypatch):
    """The PACS is down at first: the send (the SR and the secondary capture) is retried and lands."""
    monkeypatch.setattr(sender_module, "BACKOFF_FIRST", 0.3)
    pacs_port, pacs_dir = free_port(), tmp_path / "pacs"
    pacs_dir.mkdir()
    service = Service(ServeConfig(model=tiny_model, work=tmp_path / "work", port=0, quiet_seconds=QUIET,
                                  device="cpu", send_to=Destination("PACS", "127.0.0.1", pacs_port)))
    pacs = None
    try:
        service.start()
        series = phantom_series(4)
        uid = str(series[0].SeriesInstanceUID)
        assert send(service.port, series) == [0] * len(series)
        retried = wait_for(lambda: (r := job(service.queue, uid)) and r["send_attempts"] >= 1
                           and r["send_state"] == "pending" and r, "a failed first send")
        assert "PACS@127.0.0.1" in retried["send_error"]
        pacs = subprocess.Popen([STORESCP, "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sent = wait_for(lambda: (r := job(service.queue, uid)) and r["send_state"] == "sent" and r, "the send")
        assert sent["sent_files"] == 2 and sent["send_attempts"] >= 2
        received = sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in pacs_dir.iterdir() if p.is_file())
        results = sorted((service.queue.work_dir / "results" / uid).glob("S[RC]_*.dcm"))
        assert [p.name[:3] for p in results] == ["SC_", "SR_"]
        assert received == sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in results)
        events = [e["event"] for e in service.queue.events(uid)]
        assert "send retry" in events and events[-1] == "sent"
    finally:
        service.stop()
        if pacs is not None:
            pacs.kill()
            pacs.wait(10)


# -- the real command in a child process ----------------------------------------------------------
LAUNCHER = """
import sys, time
if sys.argv[1] == "--slow-staging":
    sys.argv.pop(1)
    import liverstage.runtime.serve.worker as worker
    def slow(*args, **kwargs):
        time.sleep(600)
    worker.stage_series = slow
from liverstage.runtime.cli import main
main(sys.argv[1:])
"""


class ServeProcess:
    """`liverstage serve` as a child process on a free port; its log is a file."""

    def __init__(self, model, work: Path, log: Path, *extra: str, slow: bool = False, env: dict | None = None) -> None:
        self.log = log
        args = [sys.executable, "-c", LAUNCHER, *(["--slow-staging"] if slow else []), "serve", "--model", str(model),
                "--work", str(work), "--port", "0", "--device", "cpu", "--threads", "1", *extra]
        self.offset = log.stat().st_size if log.exists() else 0
        self.handle = log.open("a")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.handle,
                                     env={**os.environ, **(env or {})})
        self.port = None
        try:
            match = wait_for(self._listening, "the server to listen")
            self.port = int(match.group(1))
        except BaseException:
            self.kill()
            raise

    def _listening(self):
        if self.proc.poll() is not None:
            pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
        return re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log.read_text()[self.offset:])

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.handle.close()

    def terminate(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()


def start(model, work, tmp_path, *extra, slow=False, env=None) -> ServeProcess:
    return ServeProcess(model, work, tmp_path / "serve.log", *extra, slow=slow, env=env)


def restart_expect_staged_once(model, work, tmp_path, uid, *, attempts):
    """Start the server again: the series is staged, once, and SIGTERM then ends it with 0."""
    server = start(model, work, tmp_path, "--quiet-seconds", str(QUIET))
    try:
        queue = JobQueue(work)
        done = wait_for(lambda: final(queue, uid), "staging after the restart")
        assert done["state"] == "done" and done["attempts"] == attempts
        assert terminal_events(queue, uid) == ["done"]
        assert (work / "results" / uid / "report.json").is_file()
        assert server.terminate() == 0
    finally:
        server.kill()
    assert (tmp_path / "serve.log").read_text().rstrip().endswith("stopped")


@pytest.mark.slow
def test_kill9_between_receipt_and_staging_stages_once_after_restart(tmp_path, tiny_model):
    work = tmp_path / "work"
    series = phantom_series(0)
    uid = str(series[0].SeriesInstanceUID)
    server = start(tiny_model, work, tmp_path, "--quiet-seconds", "60")
    try:
        assert send(server.port, series) == [0] * len(series)
        row = job(JobQueue(work), uid)
        assert row["state"] == "received" and row["instances"] == len(series)  # acknowledged = recorded
    finally:
        server.kill()  # SIGKILL: no chance to tidy up
    restart_expect_staged_once(tiny_model, work, tmp_path, uid, attempts=1)


@pytest.mark.slow
def test_kill9_during_staging_stages_once_after_restart(tmp_path, tiny_model):
    work = tmp_path / "work"
    series = phantom_series(1)
    uid = str(series[0].SeriesInstanceUID)
    server = start(tiny_model, work, tmp_path, "--quiet-seconds", str(QUIET), slow=True)
    try:
        assert send(server.port, series) == [0] * len(series)
        queue = JobQueue(work)
        wait_for(lambda: (r := job(queue, uid)) and r["state"] == "running", "staging to start")
    finally:
        server.kill()
    assert job(JobQueue(work), uid)["state"] == "running"
    restart_expect_staged_once(tiny_model, work, tmp_path, uid, attempts=2)
    assert "attempt 1 did not finish; queued again" in (tmp_path / "serve.log").read_text()


@pytest.mark.slow
def test_sigterm_requeues_the_running_job_and_exits_0(tmp_path, tiny_model):
    work = tmp_path / "work"
    series = phantom_series(2)
    uid = str(series[0].SeriesInstanceUID)
    server = start(tiny_model, work, tmp_path, "--quiet-seconds", str(QUIET), "--stop-timeout", "0.5", slow=True)
    try:
        assert send(server.port, series) == [0] * len(series)
        queue = JobQueue(work)
        wait_for(lambda: (r := job(queue, uid)) and r["state"] == "running", "staging to start")
        t0 = time.monotonic()
        assert server.terminate() == 0
        assert time.monotonic() - t0 < 10
    finally:
        server.kill()
    row = job(JobQueue(work), uid)
    assert row["state"] == "queued" and terminal_events(JobQueue(work), uid) == []
    log = (tmp_path / "serve.log").read_text()
    assert "SIGTERM received" in log and "queued again" in log
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} ", log, re.M)  # timestamped lines


@pytest.mark.slow
def test_three_associations_twenty_series_each_staged_once_memory_flat(tmp_path, tiny_model):
    work = tmp_path / "work"
    # glibc gives every thread that allocates its own malloc arena, and the pages of those arenas
    # stay resident: with the default (8 per core) the RSS climbs for the first few dozen series
    # and then levels off (measured: 265 -> 304 MB over 40 series, flat after about 30). Two arenas
    # take that allocator effect out, so what is left to grow would be a real leak.
    # A quiet period well above QUIET: with three associations and staging sharing two cores (and
    # one GIL), an association can stall for more than 0.4 s between two instances, and a series
    # whose instance arrives after its quiet period is, correctly, staged again (runs == 2). 3 s,
    # not 2: the whole suite run with the two cores also loaded by three busy loops failed here
    # once (in 1 of 2 such runs; it passed in 6 runs outside the whole suite; cause not known).
    server = start(tiny_model, work, tmp_path, "--quiet-seconds", "3", env={"MALLOC_ARENA_MAX": "2"})
    try:
        queue = JobQueue(work)
        for k in range(3):  # warm-up: the first series load the model, matplotlib, highdicom, malloc arenas
            warm = phantom_series(k, slices=10)
            assert send(server.port, warm) == [0] * len(warm)
            wait_for(lambda warm=warm: final(queue, str(warm[0].SeriesInstanceUID)), "a warm-up series")

        def three_senders(n_series: int) -> dict[str, int]:
            """n_series sent over three associations at once; {series UID: instances} once all are final."""
            batches = [[phantom_series(i % 3, slices=10) for i in range(k, n_series, 3)] for k in range(3)]
            failures = []

            def sender(batch):
                try:
                    for series in batch:
                        statuses = send(server.port, series)
                        if statuses != [0] * len(series):
                            failures.append(statuses)
                except Exception as exc:  # noqa: BLE001  (reported by the main thread)
                    failures.append(repr(exc))

            threads = [threading.Thread(target=sender, args=(b,)) for b in batches]
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT)
            assert not any(t.is_alive() for t in threads), "a sender did not finish"
            assert failures == [], f"C-STORE failures: {failures}"
            sizes = {str(s[0].SeriesInstanceUID): len(s) for b in batches for s in b}
            assert len(sizes) == n_series
            wait_for(lambda: all(final(queue, u) for u in sizes), f"all {n_series} series", timeout=120)
            for u in sizes:
                row = job(queue, u)
                assert (row["state"], row["instances"], row["runs"]) == ("done", sizes[u], 1), f"{u}: {row}"
                assert terminal_events(queue, u) == ["done"], f"{u}: {queue.events(u)}"
            return sizes

        three_senders(20)
        three_senders(20)
        rss_after_40 = server.rss_kb()
        three_senders(20)
        rss_after_60 = server.rss_kb()
        assert len(list((work / "results").iterdir())) == 63
        # Flat: bounded caches (fonts, text layout, pydicom's dictionaries) and the allocator's
        # pools fill during the first few dozen series, longer when the machine is busy (measured
        # with the 2 cores overloaded, MB after each 20: 277, 295, 297, 297, 297); after 40 more
        # series another 20 must not add memory. A figure or volume kept per series would add
        # several MB each.
        growth_mb = (rss_after_60 - rss_after_40) / 1024
        assert growth_mb < 12, (f"server RSS grew {growth_mb:.1f} MB over the third 20 series "
                                f"({rss_after_40 // 1024} -> {rss_after_60 // 1024} MB)")
        assert server.terminate() == 0
    finally:
        server.kill()
