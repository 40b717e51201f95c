"""Runs one Python Celery worker over N queued `sleep(ms)` tasks and prints `name value unit` lines:
drain_wall_s (worker start to the last task done), drain_rate, peak_rss_mib (the worker's process
tree, sampled every 50 ms). Usage: drive.py POOL CONCURRENCY N MS"""
import os
import subprocess
import sys
import time

import redis

pool, conc, n, ms = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
here = os.path.dirname(os.path.abspath(__file__))
counter = redis.Redis.from_url(os.environ["IO_COUNTER"])
sys.path.insert(0, here)
from ioapp import app, sleep  # noqa: E402

app.control.purge()
counter.delete("bench-io:done")
with app.producer_or_acquire() as producer:
    for _ in range(n):
        sleep.apply_async((ms,), producer=producer)


def tree_rss_kib(pid):
    """Resident memory of `pid` and its descendants, in KiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return total


celery = os.path.join(os.path.dirname(sys.executable), "celery")
args = [celery, "-A", "ioapp", "worker", "-P", pool, "-c", conc, "--loglevel", "warning",
        "--without-gossip", "--without-mingle", "--without-heartbeat"]
t = time.monotonic()
worker = subprocess.Popen(args, cwd=here, env=dict(os.environ, PYTHONPATH=here), stdout=subprocess.DEVNULL)
peak = 0
try:
    while int(counter.get("bench-io:done") or 0) < n:
        if worker.poll() is not None:
            sys.exit(f"the worker exited with {worker.returncode}")
        if time.monotonic() - t > 900:
            sys.exit("the drain did not finish within 15 minutes")
        peak = max(peak, tree_rss_kib(worker.pid))
        time.sleep(0.05)
    wall = time.monotonic() - t
finally:
    worker.terminate()
    worker.wait(30)
print(f"drain_wall_s {wall:.3f} s")
print(f"drain_rate {n / wall:.1f} tasks/s")
print(f"peak_rss_mib {peak / 1024:.1f} MiB")
