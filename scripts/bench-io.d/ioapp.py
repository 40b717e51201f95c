"""Python Celery's side of scripts/bench-io: one I/O-bound task, `sleep(ms)`, which waits on a timer
(`time.sleep`, cooperative under gevent's monkey patching) and counts itself done in Redis."""
import os
import time

import redis
from celery import Celery

app = Celery("ioapp", broker=os.environ["IO_BROKER"])
app.conf.task_ignore_result = True
app.conf.broker_connection_retry_on_startup = True
app.conf.worker_prefetch_multiplier = 4
_done = redis.Redis.from_url(os.environ["IO_COUNTER"])


@app.task(name="sleep")
def sleep(ms):
    time.sleep(ms / 1000)
    _done.incr("bench-io:done")
    return ms
