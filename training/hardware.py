"""Facts about the machine that decide fast defaults, and the line that tells a user what they are."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

import torch

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below bf16 arithmetic: set to one of these, PyTorch's
# convolutions and matmuls run without the CPU's bf16 units, as on a CPU that lacks them.
_ISA_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo; empty elsewhere)."""
    found = re.search(r"^flags\s*:(.*)$", _cpuinfo(), re.MULTILINE)
    return set(found.group(1).split()) if found else set()


def cpu_name() -> str:
    """The CPU's model name, or the platform's processor string where /proc/cpuinfo is absent."""
    found = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), re.MULTILINE)
    if found:
        return found.group(1).strip()
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def _isa_cap() -> str | None:
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap.upper() if cap else None


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 matmuls and convolutions natively (AMX or AVX-512 BF16).

    Without these instructions PyTorch falls back to slow reference kernels for bf16
    convolutions (measured here on an AVX2-only CPU: a 3x3 conv ran 5-12x slower in bf16 than
    fp32), so bf16 must not be the default there. A oneDNN ISA cap below bf16
    (``ONEDNN_MAX_CPU_ISA=AVX2``, which emulates such a CPU) counts as lacking them.
    """
    if _isa_cap() in _ISA_WITHOUT_BF16:
        return False
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def default_mixed_precision() -> str:
    """``bf16`` where it is fast (a bf16-capable GPU, or a CPU with AMX/AVX-512 BF16), else ``no``."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "no"


def _cpu_features() -> str:
    flags = cpu_flags()
    named = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16")) if flag in flags]
    if not named:
        named = ["AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"]
        named.append("no bf16 units")
    cap = _isa_cap()
    if cap:
        named.append(f"oneDNN capped at {cap}")
    kernels = torch.backends.cpu.get_cpu_capability()
    return ", ".join(named) + f"; PyTorch kernels {kernels}"


def describe_machine(mixed_precision: str) -> str:
    """One line: the device, the CPU features that matter for speed, the precision and why.

    Args:
        mixed_precision: the run's setting (``auto``, ``no``, ``bf16``, ``fp16``).
    """
    chosen = default_mixed_precision() if mixed_precision == "auto" else mixed_precision
    shown = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[chosen]
    if torch.cuda.is_available():
        where = f"GPU {torch.cuda.get_device_name()}"
        why = "auto: the GPU's fastest" if mixed_precision == "auto" else "as configured"
    else:
        threads = torch.get_num_threads()
        where = f"CPU {cpu_name()} ({threads} thread{'s' if threads != 1 else ''}; {_cpu_features()})"
        if mixed_precision != "auto":
            why = "as configured"
        elif chosen == "bf16":
            why = "auto: the CPU has bf16 units"
        else:
            why = "auto: without AMX or AVX-512 BF16, bf16 runs 5-12x slower than fp32"
    return f"machine: {where}; precision {shown} ({why})"
