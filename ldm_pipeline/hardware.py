"""Facts about the machine that decide fast defaults."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 matmuls and convolutions natively (AMX or AVX-512 BF16).

    Without these instructions PyTorch falls back to slow reference kernels for bf16
    convolutions (measured here on an AVX2-only CPU: a 3x3 conv ran 5-12x slower in bf16 than
    fp32), so bf16 must not be the default there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def default_mixed_precision() -> str:
    """``bf16`` where it is fast (a bf16-capable GPU, or a CPU with AMX/AVX-512 BF16), else ``no``."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "no"
