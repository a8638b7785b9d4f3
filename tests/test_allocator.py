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

PAGES = 2**26 * 4 // 4096  # one 256 MB fp32 buffer, in 4 KB pages

PROBE = """
import resource, sys, torch
from postlab.models import load_lm
load_lm(sys.argv[1], device="cpu", precision="fp32")
x = torch.ones(2**26); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(2**26)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _refaults(model_dir, **env) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "POSTLAB_KEEP_FREED_MEMORY"}
    p = subprocess.run([sys.executable, "-c", PROBE, str(model_dir)], capture_output=True, text=True,
                       env={**clean, **env}, check=True)
    return int(p.stdout.split()[-1])


def test_a_freed_buffer_is_reused_without_page_faults(tiny_llama):
    assert _refaults(tiny_llama) < PAGES // 20


def test_opting_out_leaves_malloc_as_it_was(tiny_llama):
    # glibc unmaps a freed 256 MB block (above its 32 MB mmap ceiling); touching its successor faults
    assert _refaults(tiny_llama, POSTLAB_KEEP_FREED_MEMORY="0") > PAGES // 2
    # the user's own malloc tunables win over postlab's
    assert _refaults(tiny_llama, MALLOC_TRIM_THRESHOLD_="131072") > PAGES // 2
