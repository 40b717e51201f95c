"""The Python Celery side of tests/tests/python_interop.rs.

As a Celery app (`celery -A interop_app worker`) it serves a task named `add`.
As a script (`python interop_app.py <queue>`) it is a producer: it sends `add(2, 3)` and
`fail('oops')` to <queue>, then `add(4, 5)` with a 2 s countdown (a Celery ETA message, which
our Redis worker finds with no wake-up and holds in its delayed set), waits for each and prints
one JSON line with what it got and how long the countdown task took.
`python interop_app.py chain <queue>` sends the chain `add(2, 3) | add(10) | add(100)`, every
step to <queue>, waits for the last result and prints it as one JSON line.
`python interop_app.py chord <queue>` sends the chord `[add(i, i) for i in range(10)] | tsum()`,
every task to <queue>, and prints the body's result (90) as one JSON line.
With TRACEPARENT in the environment, `add` is sent with that `traceparent` header; the task
`traceparent` returns the `traceparent` its request carries.
`python interop_app.py revoke <id>` revokes a task id through `app.control.revoke`.

The broker and backend come from CELERY_BROKER_URL and CELERY_RESULT_BACKEND.
"""

import json
import os
import sys
import time

from celery import Celery, chain, chord

app = Celery(
    "interop_app",
    broker=os.environ["CELERY_BROKER_URL"],
    backend=os.environ["CELERY_RESULT_BACKEND"],
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
)


@app.task(name="add")
def add(x, y):
    return x + y


@app.task(name="traceparent", bind=True)
def traceparent(self):
    # Where opentelemetry-instrumentation-celery reads the trace context on a worker.
    return getattr(self.request, "traceparent", None)


@app.task(name="tsum")
def tsum(values):
    return sum(values)


def produce(queue):
    # With TRACEPARENT set, `add` carries it as opentelemetry-instrumentation-celery injects it: a
    # top-level message header.
    headers = {"traceparent": os.environ["TRACEPARENT"]} if "TRACEPARENT" in os.environ else None
    added = app.send_task("add", args=[2, 3], queue=queue, headers=headers).get(timeout=30)
    try:
        app.send_task("fail", args=["oops"], queue=queue).get(timeout=30, propagate=True)
    except Exception as exc:  # the worker's error, rebuilt as a Python exception
        failure = {"type": type(exc).__name__, "message": str(exc)}
    else:
        failure = None
    sent = time.monotonic()
    later = app.send_task("add", args=[4, 5], queue=queue, countdown=2).get(timeout=30)
    print(json.dumps({"add": added, "fail": failure, "countdown": later, "countdown_took": time.monotonic() - sent}))


def produce_chain(queue):
    # `apply_async(queue=...)` only routes the first task: each step carries its own queue.
    steps = [
        app.signature("add", args=(2, 3)).set(queue=queue),
        app.signature("add", args=(10,)).set(queue=queue),
        app.signature("add", args=(100,)).set(queue=queue),
    ]
    result = chain(*steps).apply_async()
    print(json.dumps({"chain": result.get(timeout=30)}))


def produce_chord(queue):
    header = [app.signature("add", args=(i, i)).set(queue=queue) for i in range(10)]
    body = app.signature("tsum").set(queue=queue)
    result = chord(header)(body)
    print(json.dumps({"chord": result.get(timeout=30)}))


def revoke(task_id):
    app.control.revoke(task_id)
    print(json.dumps({"revoked": task_id}))


if __name__ == "__main__":
    if sys.argv[1] == "revoke":
        revoke(sys.argv[2])
    elif sys.argv[1] == "chain":
        produce_chain(sys.argv[2])
    elif sys.argv[1] == "chord":
        produce_chord(sys.argv[2])
    else:
        produce(sys.argv[1])
