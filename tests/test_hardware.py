"""The machine line: the CPU's features, the precision chosen and why."""

import pytest
from ldm_pipeline.training import hardware

AVX2_ONLY = "model name\t: Test CPU 3000\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
BF16 = "model name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"


@pytest.fixture
def cpu(monkeypatch):
    def use(text: str) -> None:
        monkeypatch.setattr(hardware, "_cpuinfo", lambda: text)
        monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    return use


def test_an_avx2_cpu_trains_in_fp32_and_says_why(cpu):
    cpu(AVX2_ONLY)
    assert hardware.default_mixed_precision() == "no"
    line = hardware.describe_machine("auto")
    assert line.startswith("machine: CPU Test CPU 3000 (")
    assert "AVX2, no bf16 units" in line and "precision fp32 (auto: without AMX or AVX-512 BF16" in line


def test_a_bf16_cpu_trains_in_bf16_unless_configured_otherwise(cpu):
    cpu(BF16)
    assert hardware.default_mixed_precision() == "bf16"
    assert "AVX-512 BF16" in hardware.describe_machine("auto")
    assert "precision bf16 autocast (auto: the CPU has bf16 units)" in hardware.describe_machine("auto")
    assert "precision fp32 (as configured)" in hardware.describe_machine("no")


def test_a_onednn_cap_below_bf16_counts_as_a_cpu_without_bf16_units(cpu, monkeypatch):
    cpu(BF16)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert hardware.default_mixed_precision() == "no"
    assert "oneDNN capped at AVX2" in hardware.describe_machine("auto")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert hardware.default_mixed_precision() == "bf16"
