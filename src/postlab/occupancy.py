"""Which postlab processes are training on this machine's CPU. Each registers while it trains (a
small file per process in a machine-local folder); one that starts when the others' threads and its
own exceed the cores is warned, since each of them uses every thread it has and they slow each other
down. `postlab study run --workers N` splits the cores between its workers, so they are not warned."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

from .checkpoint import atomic_write_json

log = logging.getLogger("postlab")


def registry_dir() -> Path:
    """Machine-local (never a shared home on a cluster): one folder per user in the temp directory."""
    return Path(tempfile.gettempdir()) / f"postlab-training-{os.getuid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def others() -> list[dict]:
    """The other live training processes (entries of processes that have ended are removed)."""
    found = []
    for path in registry_dir().glob("*.json"):
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            pid = int(entry["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not ours
        if pid == os.getpid():
            continue
        if _alive(pid):
            found.append(entry)
        else:
            path.unlink(missing_ok=True)
    return found


@contextlib.contextmanager
def training_on_cpu(threads: int, what: str):
    """Registers this process for the duration (`what`: the run, for the others' warnings) and warns
    when the threads of all training processes exceed this machine's cores."""
    cores = os.cpu_count() or 1
    me = registry_dir() / f"{os.getpid()}.json"
    try:
        me.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(me, {"pid": os.getpid(), "threads": threads, "what": what})
        busy = others()
    except OSError:  # a read-only temp directory must not stop training
        busy = []
    total = threads + sum(int(o.get("threads", 1)) for o in busy)
    if busy and total > cores:
        names = ", ".join(f"pid {o['pid']} ({o.get('what', '?')}, {o.get('threads', '?')} threads)" for o in busy)
        log.warning("other postlab processes are training on this machine's CPU: %s. With this one (%d threads) "
                    "that is %d threads on %d cores: they slow each other down, and their timings are not this "
                    "machine's. Run them one after another, as one study (`postlab study run --workers N` splits "
                    "the cores), or with fewer threads each (OMP_NUM_THREADS).", names, threads, total, cores)
    try:
        yield busy
    finally:
        me.unlink(missing_ok=True)
