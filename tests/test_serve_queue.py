"""The pieces of `liverstage serve` without a network: queue states, instance store, series rules, options."""

import os

import numpy as np
import pytest

from liverstage.runtime.errors import InputError
from liverstage.runtime.serve.queue import MAX_ATTEMPTS, JobQueue
from liverstage.runtime.serve.sender import Destination, check_ae_title
from liverstage.runtime.serve.service import ServeConfig
from liverstage.runtime.serve.store import InstanceStore, valid_uid


def record(queue, sop, series="1.2.3", now=0.0):
    return queue.record_instance(sop_uid=sop, series_uid=series, study_uid="1.2", path=f"incoming/{series}/{sop}.dcm",
                                 description="AX", modality="MR", calling_ae="SCANNER", now=now)


def test_series_lifecycle_quiet_period_and_late_instances(tmp_path):
    q = JobQueue(tmp_path)
    assert record(q, "1.2.3.1", now=100.0) == "new series"
    assert record(q, "1.2.3.2", now=101.0) == "added"
    assert record(q, "1.2.3.2", now=101.5) == "duplicate"
    assert q.promote_quiet(10.0, now=110.0) == []          # last instance 9 s ago
    assert q.next_quiet_due(10.0) == 111.0
    assert q.promote_quiet(10.0, now=111.0) == ["1.2.3"]
    assert record(q, "1.2.3.3", now=112.0) == "quiet period restarted"
    assert q.claim(now=113.0) is None                       # received again, not queued
    q.promote_quiet(10.0, now=122.0)
    job = q.claim(now=122.0)
    assert job.series_uid == "1.2.3" and job.attempts == 1
    assert q.finish(job, "done", stage="B", uncertain=False, now=123.0) == "done"
    row = q.jobs()[0]
    assert (row["state"], row["stage"], row["instances"], row["runs"], row["send_state"]) == ("done", "B", 3, 1, "")
    assert record(q, "1.2.3.4", now=130.0) == "reopened"    # Orthanc: a stable series becomes unstable again
    assert q.jobs()[0]["state"] == "received" and q.jobs()[0]["stage"] is None
    events = [e["event"] for e in q.events("1.2.3")]
    assert events == ["received", "queued", "queued", "running", "done", "reopened"]


def test_instance_during_staging_drops_the_result_and_stages_again(tmp_path):
    q = JobQueue(tmp_path)
    record(q, "1.2.3.1", now=0.0)
    q.promote_quiet(1.0, now=5.0)
    job = q.claim(now=5.0)
    assert record(q, "1.2.3.2", now=6.0) == "restage after this run"
    assert q.finish(job, "done", stage="A", now=7.0) == "received"
    row = q.jobs()[0]
    assert row["state"] == "received" and row["runs"] == 0 and row["stage"] is None
    q.promote_quiet(1.0, now=8.0)
    again = q.claim(now=8.0)
    assert q.finish(again, "skipped", reason="not axial", now=9.0) == "skipped"
    assert [e["event"] for e in q.events() if e["event"] in ("done", "skipped", "failed")] == ["skipped"]


def test_restart_requeues_running_then_gives_up(tmp_path):
    q = JobQueue(tmp_path)
    record(q, "1.2.3.1")
    q.promote_quiet(0.0, now=1.0)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        job = q.claim()
        assert job.attempts == attempt
        q.close()
        q = JobQueue(tmp_path)                              # "the process died"
        lines = q.recover()
        assert len(lines) == 1
    row = q.jobs()[0]
    assert row["state"] == "failed" and f"{MAX_ATTEMPTS} attempts never finished" in row["reason"]
    # An attempt that no longer owns its series changes nothing.
    assert q.finish(job, "done", stage="A") == ""
    assert q.jobs()[0]["state"] == "failed"


def test_send_states_retry_and_recovery(tmp_path):
    q = JobQueue(tmp_path)
    record(q, "1.2.3.1")
    q.promote_quiet(0.0, now=1.0)
    job = q.claim(now=1.0)
    q.finish(job, "done", stage="C", send=True, now=2.0)
    assert q.claim_send(now=1.0) is None                    # not due before it was done
    send = q.claim_send(now=2.0)
    assert send.send_attempts == 1
    q.finish_send(send, error="association with PACS@h:1 rejected", retry_at=10.0, now=3.0)
    assert q.claim_send(now=9.0) is None and q.next_send_due() == 10.0
    send = q.claim_send(now=10.0)
    q.close()
    q = JobQueue(tmp_path)
    assert q.recover() == ["1 interrupted send(s) pending again"]
    send = q.claim_send(now=11.0)
    assert send.send_attempts == 3
    q.finish_send(send, files=2, now=12.0)
    row = q.jobs()[0]
    assert (row["send_state"], row["sent_files"], row["send_error"]) == ("sent", 2, "")
    assert [e["event"] for e in q.events()][-2:] == ["send retry", "sent"]


def test_queue_opened_read_only_needs_a_queue(tmp_path):
    with pytest.raises(InputError, match="no liverstage serve queue"):
        JobQueue(tmp_path / "nothing", create=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "queue.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(InputError, match="queue.sqlite"):
        JobQueue(tmp_path / "bad", create=False)


@pytest.mark.parametrize("uid, ok", [
    ("1.2.840.10008.5.1.4.1.1.4", True), ("0", True), ("1." + "2" * 62, True), ("1." + "2" * 63, False),
    ("../../x", False), ("1.2/../../x", False), ("1.02.3", False), ("1..2", False), ("1.2.", False),
    ("", False), ("1.2.3\x00", False), (" 1.2", False), (None, False),
])
def test_uid_grammar(uid, ok):
    assert valid_uid(uid) is ok


def test_store_paths_stay_inside_and_writes_are_all_or_nothing(tmp_path, monkeypatch):
    store = InstanceStore(tmp_path)
    path = store.write("1.2.3", "1.2.3.4", b"DICM data")
    assert path == (tmp_path / "incoming" / "1.2.3" / "1.2.3.4.dcm").resolve() and path.read_bytes() == b"DICM data"
    assert store.relative(path) == os.path.join("incoming", "1.2.3", "1.2.3.4.dcm")
    for series, sop in [("../..", "1.2"), ("1.2.3", "../../x"), ("1.2/../..", "1.2")]:
        with pytest.raises(ValueError, match="not a valid UID"):
            store.write(series, sop, b"x")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        store.write("1.2.3", "1.2.3.5", b"DICM more")
    assert sorted(p.name for p in (tmp_path / "incoming" / "1.2.3").iterdir()) == ["1.2.3.4.dcm"]
    (tmp_path / "incoming" / "1.2.3" / ".1.2.3.6.abc.tmp").write_bytes(b"left by a killed process")
    assert store.remove_leftovers() == 1


def _headers(n=10, **changes):
    pydicom = pytest.importorskip("pydicom")
    out = []
    for k in range(n):
        ds = pydicom.Dataset()
        ds.Modality = "MR"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesDescription = "AX T1 VIBE"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 2.0 * k]
        for key, value in changes.items():
            setattr(ds, key, value)
        out.append(ds)
    return out


def test_serve_stages_by_the_study_rules():
    """The node decides staged/skipped with the very rules `predict` applies to a study."""
    from liverstage.runtime import dicom_study
    from liverstage.runtime.serve import staging

    assert staging.series_verdict is dicom_study.series_verdict
    ok, why = staging.series_verdict(_headers(Modality="CT"))
    assert not ok and "CT" in why


def test_options_checked_early(tmp_path):
    assert Destination.parse("PACS@10.0.0.5:104") == Destination("PACS", "10.0.0.5", 104)
    for bad in ("PACS@host", "@host:104", "PACS@host:0", "PACS@host:70000", "A_TITLE_LONGER_THAN_16@h:104"):
        with pytest.raises(InputError, match="--send-to"):
            Destination.parse(bad)
    assert check_ae_title("SCANNER1", "--allow-ae") == "SCANNER1"
    for bad in ("", "   ", "BACK\\SLASH", "X" * 17, "TAB\tX"):
        with pytest.raises(InputError, match="AE title"):
            check_ae_title(bad, "--ae-title")
    with pytest.raises(InputError, match="--quiet-seconds"):
        ServeConfig(model=tmp_path / "m.onnx", work=tmp_path, quiet_seconds=-1)
    with pytest.raises(InputError, match="--allow-ae"):
        ServeConfig(model=tmp_path / "m.onnx", work=tmp_path, allow_ae=("OK", "NOT OK\\"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="--work is not a folder"):
        ServeConfig(model=tmp_path / "m.onnx", work=tmp_path / "file")


def test_cli_bad_options_one_line_exit_2(run_cli, tmp_path, tiny_model):
    pytest.importorskip("pynetdicom")
    code, out, err = run_cli(["serve", "--model", tiny_model, "--work", tmp_path / "w", "--send-to", "nowhere"])
    assert code == 2 and err.count("\n") == 1 and "--send-to must be AE@HOST:PORT" in err
    (tmp_path / "bad.onnx").write_bytes(b"not an onnx model")
    code, out, err = run_cli(["serve", "--model", tmp_path / "bad.onnx", "--work", tmp_path / "w2", "--port", "0"])
    assert code == 2 and err.count("\n") == 1 and "bad.onnx" in err and "listening" not in err
    code, out, err = run_cli(["jobs", "--work", tmp_path / "none"])
    assert code == 2 and "no liverstage serve queue" in err and not (tmp_path / "none").exists()
