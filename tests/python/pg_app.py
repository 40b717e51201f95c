"""The Python Celery side of tests/tests/postgres_results.rs: results in PostgreSQL through
Celery's database backend (SQLAlchemy), with `result_extended`.

As a Celery app (`celery -A pg_app worker`) it serves `pg_py_add` and `pg_py_fail`.
As a script: `python pg_app.py create` creates Celery's tables (as a Python deployment has them);
`python pg_app.py produce` sends our worker `pg_add(2, 3)` and `pg_fail('oops')`, waits for both
through `AsyncResult.get()` and prints one JSON line with what it got and the stored meta;
`python pg_app.py state <id>` waits (30 s at most) until task <id> is in the custom state
PROGRESS and prints one JSON line with `AsyncResult.state` and `.info` then.

The broker and backend come from CELERY_BROKER_URL and CELERY_RESULT_BACKEND (a
`db+postgresql://` URL); the Redis key prefix from CELERY_RS_KEYPREFIX.
"""

import json
import os
import sys
import time

from celery import Celery

app = Celery(
    "pg_app",
    broker=os.environ["CELERY_BROKER_URL"],
    backend=os.environ["CELERY_RESULT_BACKEND"],
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_extended=True,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"global_keyprefix": os.environ["CELERY_RS_KEYPREFIX"]},
    result_backend_transport_options={},
)


@app.task(name="pg_py_add")
def pg_py_add(x, y):
    return x + y


@app.task(name="pg_py_fail")
def pg_py_fail(key):
    return {}[key]


def produce():
    r = app.send_task("pg_add", args=[2, 3])
    added = r.get(timeout=30)
    meta = r._get_task_meta()
    try:
        app.send_task("pg_fail", args=["oops"]).get(timeout=30, propagate=True)
    except Exception as exc:  # the worker's error, rebuilt as a Python exception
        failure = {"type": type(exc).__name__, "message": str(exc)}
    else:
        failure = None
    shown = {k: meta.get(k) for k in ("status", "name", "worker", "retries")}
    print(json.dumps({"add": added, "fail": failure, "meta": shown}))


def state(task_id):
    r = app.AsyncResult(task_id)
    deadline = time.monotonic() + 30
    while r.state != "PROGRESS" and time.monotonic() < deadline:
        time.sleep(0.02)
    print(json.dumps({"state": r.state, "info": r.info}))


if __name__ == "__main__":
    if sys.argv[1] == "create":
        app.backend.ResultSession().close()
        print(json.dumps({"created": True}))
    elif sys.argv[1] == "produce":
        produce()
    elif sys.argv[1] == "state":
        state(sys.argv[2])
