"""`liverstage serve`: a DICOM storage node that stages every complete series it receives.

Pieces, one job each (they meet only through the SQLite queue in the work folder):
    store.py    UID checks and the durable instance store (DIR/incoming/<series>/<instance>.dcm)
    queue.py    the job queue and its state machine (DIR/queue.sqlite, WAL mode)
    scp.py      the pynetdicom Storage SCP (C-STORE of MR images, C-ECHO)
    staging.py  series rules, opening the model, staging a series as `predict` does, results
    worker.py   the thread that turns quiet series into jobs and stages them, one at a time
    sender.py   the thread that sends DICOM results to the PACS, with retries and backoff
    service.py  starts and stops them all (SIGTERM), logging
pydicom and pynetdicom are imported only by the modules that talk DICOM.
"""
