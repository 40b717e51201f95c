"""The Python Celery side of tests/tests/celery_tools.rs: Celery's own tools against our workers.

As a Celery app (`celery -A tools_app worker|flower|events|inspect|control|purge`) it declares the
demo binary's task names (`add`, `sleep`, `tsum`, `fail`, `echo`), so a Python worker runs the same
tasks as ours and Flower's rate-limit and time-limit forms accept their names.

As a script:
- `python tools_app.py batch '<json list>'` runs each item in this one interpreter and prints one JSON
  line with a list of outcomes, in order. An item is `{"cli": [args...]}`, run through the real
  `celery` command line (its click entry point, as `python -m celery -A tools_app args...` runs it,
  without starting Python again for every command): `{"exit", "stdout", "stderr"}`; or
  `{"broadcast": method, "arguments": {...}, "destination": [...], "timeout": s}`, sent with
  `app.control.broadcast(..., reply=True)` (for `election`, whose arguments the command line cannot
  pass): `{"replies": [...]}`; or `{"send": name, "args": [...], "queue": q, "countdown": s}`, sent
  with `app.send_task` (Celery's own message, eta included): `{"id": task_id}`.
- `python tools_app.py exceptions <queue> <worker> '<json>'` sends to <queue> the failures a caller
  meets (a revoked, an expired, a time-limited, an unregistered, a wrong-argument task and a chord
  with a failing member), calls `get()` on each and prints one JSON line mapping each case to
  `{"raised": "module.ClassName", "caught": bool}`: whether `except` of the class the JSON argument
  names for that case (`{"revoked": "celery.exceptions.TaskRevokedError", ...}`) catches it.
- `python tools_app.py link <queue>` sends `add.apply_async((2, 2), link=add.s(10))` to <queue> and
  prints one JSON line with the result, the ids in `AsyncResult.children` and the child's result.

The broker and backend come from CELERY_BROKER_URL and CELERY_RESULT_BACKEND; CELERY_KEYPREFIX, when
set, is Kombu's and the result backend's `global_keyprefix` (the Rust side adds the same prefix with
`?global_keyprefix=`), so that tests sharing one Redis database never see each other's keys.
"""

import importlib
import json
import os
import sys
import time
from datetime import datetime, timedelta, timezone

import celery.exceptions
from celery import Celery, chord

app = Celery(
    "tools_app",
    broker=os.environ["CELERY_BROKER_URL"],
    backend=os.environ["CELERY_RESULT_BACKEND"],
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
)
_prefix = os.environ.get("CELERY_KEYPREFIX")
if _prefix:
    if app.conf.broker_url.startswith("redis"):
        app.conf.broker_transport_options = {"global_keyprefix": _prefix}
    app.conf.result_backend_transport_options = {"global_keyprefix": _prefix}

# How long a script waits for one result.
TIMEOUT = 20


@app.task(name="add")
def add(x, y):
    return x + y


@app.task(name="sleep")
def sleep(ms):
    time.sleep(ms / 1000)
    return ms


@app.task(name="tsum")
def tsum(values):
    return sum(values)


@app.task(name="fail")
def fail(message):
    raise RuntimeError(message)


@app.task(name="echo")
def echo(value):
    return value


def batch(items):
    from click.testing import CliRunner

    from celery.bin.celery import celery as celery_cli

    runner = CliRunner()
    outcomes = []
    for item in items:
        if "cli" in item:
            result = runner.invoke(celery_cli, ["-A", "tools_app", *item["cli"]], catch_exceptions=True)
            outcome = {"exit": result.exit_code, "stdout": result.stdout, "stderr": result.stderr}
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                outcome["exception"] = repr(result.exception)
        elif "send" in item:
            sent = app.send_task(
                item["send"], args=item.get("args", []), queue=item["queue"], countdown=item.get("countdown")
            )
            outcome = {"id": sent.id}
        else:
            replies = app.control.broadcast(
                item["broadcast"],
                arguments=item.get("arguments", {}),
                destination=item.get("destination"),
                reply=True,
                timeout=item.get("timeout", 5),
            )
            outcome = {"replies": replies}
        outcomes.append(outcome)
    print(json.dumps(outcomes))


def resolve(dotted):
    """The class named `module.ClassName`."""
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def raised(result, expected, timeout=TIMEOUT):
    """What `get()` raised, and whether `except <expected>` catches it: Celery rebuilds a stored
    failure from its `exc_module` and `exc_type`, and makes up a class of that name (in
    `celery.exceptions`) when it cannot import one, which no `except` of the real class catches."""
    try:
        value = result.get(timeout=timeout)
    except Exception as exc:  # the stored failure, rebuilt by Celery
        cls = type(exc)
        if cls is celery.exceptions.TimeoutError:
            return {"raised": "timeout (no result)", "caught": False}
        name = f"{cls.__module__}.{cls.__name__}"
        if getattr(sys.modules.get(cls.__module__), cls.__name__, None) is not cls:
            name += " (a class Celery made up: the stored exc_module does not define it)"
        return {"raised": name, "caught": isinstance(exc, resolve(expected))}
    return {"raised": f"nothing: the result is {value!r}", "caught": False}


def wait_revoked(worker, task_id):
    """Waits until <worker> lists <task_id> as revoked (the revoke broadcast reached it)."""
    end = time.monotonic() + TIMEOUT
    while time.monotonic() < end:
        replies = app.control.inspect(destination=[worker], timeout=2).revoked() or {}
        if task_id in (replies.get(worker) or []):
            return True
        time.sleep(0.1)
    return False


def exceptions(queue, worker, expected):
    got = {}

    revoked_id = f"revoked-{os.getpid()}-{time.time_ns()}"
    app.control.revoke(revoked_id)
    if wait_revoked(worker, revoked_id):
        got["revoked"] = raised(app.send_task("add", args=[1, 1], queue=queue, task_id=revoked_id), expected["revoked"])
    else:
        got["revoked"] = {"raised": f"nothing: {worker} never listed {revoked_id} as revoked", "caught": False}

    # Expired on arrival: a date in the past (Celery warns and sends it with a TTL of 0, which
    # RabbitMQ keeps for a consumer that is ready, as ours is).
    past = datetime.now(timezone.utc) - timedelta(seconds=30)
    got["expired"] = raised(app.send_task("add", args=[1, 1], queue=queue, expires=past), expected["expired"])

    limited = app.send_task("sleep", args=[30000], queue=queue, time_limit=1)
    got["time_limit"] = raised(limited, expected["time_limit"])
    got["unregistered"] = raised(app.send_task("no_such_task", args=[], queue=queue), expected["unregistered"])
    got["wrong_arguments"] = raised(app.send_task("add", args=[1], queue=queue), expected["wrong_arguments"])

    header = [
        app.signature("add", args=(1, 1)).set(queue=queue),
        app.signature("fail", args=("member failed",)).set(queue=queue),
    ]
    body = chord(header)(app.signature("tsum").set(queue=queue))
    # The body's own result: `get()` on the handle chord() returns raises the failed member's
    # error first (it checks the header, its parent, before the body).
    got["chord"] = raised(app.AsyncResult(body.id), expected["chord"])
    print(json.dumps(got))


def link(queue):
    result = add.apply_async((2, 2), link=add.s(10).set(queue=queue), queue=queue)
    value = result.get(timeout=TIMEOUT)
    children = []
    end = time.monotonic() + TIMEOUT
    while time.monotonic() < end:
        # A fresh handle: a finished result's meta is cached by the first read.
        children = app.AsyncResult(result.id).children or []
        if children:
            break
        time.sleep(0.1)
    child_value = children[0].get(timeout=TIMEOUT) if children else None
    print(json.dumps({"result": value, "children": [c.id for c in children], "child_result": child_value}))


if __name__ == "__main__":
    if sys.argv[1] == "batch":
        batch(json.loads(sys.argv[2]))
    elif sys.argv[1] == "exceptions":
        exceptions(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    elif sys.argv[1] == "link":
        link(sys.argv[2])
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")
