"""A CPU process that loads a model keeps freed memory for reuse (postlab.allocator): a large buffer
freed and allocated again is not faulted in again. Each case runs in its own interpreter (malloc's
settings are process-wide); CPU, fp32."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")

PAGES = 2**28 // 4096  # one 256 MB block, in 4 KB pages

# A 256 MB block malloc-ed, written, freed and malloc-ed again, as a training step does with its
# gradients (through libc directly: PyTorch's 64-byte aligned requests can miss an exactly-sized
# freed block when a small allocation has landed right after it, which makes a count of its
# faults vary from run to run; bench/allocator.py measures whole stages).
PROBE = """
import ctypes, resource, sys
from postlab.models import load_lm
load_lm(sys.argv[1], device="cpu", precision="fp32")
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
n = 2**28
p = libc.malloc(n); libc.memset(p, 1, n); libc.free(p)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(n); libc.memset(p, 1, n); libc.free(p)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _refaults(model_dir, *envs: dict) -> list[float]:
    """The probe's page faults, one process per environment, run side by side (page faults are counted
    per process; most of each process's time is its imports)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "POSTLAB_KEEP_FREED_MEMORY"}
    procs = [subprocess.Popen([sys.executable, "-c", PROBE, str(model_dir)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**clean, **env}) for env in envs]
    faults = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        faults.append(float(out.split()[-1]))
    return faults


def test_a_freed_buffer_is_reused_without_page_faults(tiny_llama):
    [refaults] = _refaults(tiny_llama, {})
    assert refaults < PAGES // 20


def test_opting_out_leaves_malloc_as_it_was(tiny_llama):
    # glibc unmaps a freed 256 MB block (above its 32 MB mmap ceiling): touching the next one faults,
    # and the user's own malloc tunables win over postlab's
    opted_out, own_tunable = _refaults(tiny_llama, {"POSTLAB_KEEP_FREED_MEMORY": "0"},
                                       {"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert opted_out > PAGES // 2 and own_tunable > PAGES // 2


RELEASE = """
import sys, torch
from postlab.allocator import release_freed_memory
from postlab.models import load_lm
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
load_lm(sys.argv[1], device="cpu", precision="fp32")
x = torch.ones(2**26); del x
held = resident_mb()
release_freed_memory()
print(held - resident_mb())
"""


def test_after_a_run_the_freed_memory_goes_back_to_the_system(tiny_llama):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "POSTLAB_KEEP_FREED_MEMORY"}
    p = subprocess.run([sys.executable, "-c", RELEASE, str(tiny_llama)], capture_output=True, text=True, env=clean,
                       check=True)
    assert float(p.stdout.split()[-1]) > 200  # of the 256 MB buffer kept after its free
