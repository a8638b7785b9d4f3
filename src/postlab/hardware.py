"""What this machine is, read without torch: the CPU's name and feature flags (which decide whether
bf16 is fast here) and whether a CUDA GPU is present. `postlab study plan` estimates from these."""
from __future__ import annotations

import platform
import shutil
import sys
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bf16 matmuls (AVX-512 BF16 or AMX); elsewhere bf16 is emulated
    and several times slower than fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_name() -> str:
    """The CPU's model name and its bf16 support (what decides speed and `precision: auto` here)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or "unknown")
    native = [label for flag, label in (("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX")) if flag in cpu_flags()]
    return f"{name} ({', '.join(native) if native else 'no native bf16'})"


def cuda_present() -> bool:
    """Is there a CUDA GPU? Asks torch when it is already loaded, else looks for the NVIDIA driver
    (an estimate must not pay two seconds for `import torch`)."""
    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None
