"""Fault injection for the kill-and-resume tests (tests/test_kill_resume.py).

Named points in the code (a training step, a checkpoint write, an evaluation, a cache write, the
end of a stage) call :func:`point`. With ``POSTLAB_KILL_AT=NAME#N`` the process kills itself with
SIGKILL the N-th time it reaches point NAME -- a real, un-catchable kill at a reproducible moment;
with ``POSTLAB_FAIL_AT=NAME#N`` it raises OSError there instead (a failed write, say: what a process
does about a failure is tested with it); with ``POSTLAB_FAULT_TRACE=FILE`` it appends every point it
reaches to FILE. None set: a no-op.
"""
from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def point(name: str) -> None:
    trace, target = os.environ.get("POSTLAB_FAULT_TRACE"), os.environ.get("POSTLAB_KILL_AT")
    fail = os.environ.get("POSTLAB_FAIL_AT")
    if not trace and not target and not fail:
        return
    _counts[name] = _counts.get(name, 0) + 1
    here = f"{name}#{_counts[name]}"
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(here + "\n")
    if target == here:
        os.kill(os.getpid(), signal.SIGKILL)
    if fail == here:
        raise OSError(f"injected failure at {here} (POSTLAB_FAIL_AT)")
