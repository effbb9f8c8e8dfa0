"""precision: auto picks what is fast on the device; explicit precisions win; the resolved one is recorded."""

from __future__ import annotations

import pytest

from features import precision as precision_mod
from features.precision import cpu_flags, resolve_precision


@pytest.fixture()
def native_bf16(monkeypatch):
    """Pretend the CPU has (True) or lacks (False) native bf16."""
    def set_native(value: bool) -> None:
        monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: value)
    return set_native


def test_auto_is_fp32_on_a_cpu_without_native_bf16_and_bf16_with_it(native_bf16):
    native_bf16(False)
    assert resolve_precision("auto", "cpu") == "fp32"
    native_bf16(True)
    assert resolve_precision("auto", "cpu") == "bf16"


def test_explicit_precision_wins_whatever_the_cpu(native_bf16):
    native_bf16(False)
    assert resolve_precision("bf16", "cpu") == "bf16"
    native_bf16(True)
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("fp16", "cuda") == "fp16"


def test_auto_on_cuda_is_bf16_where_supported_else_fp16(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda") == "fp16"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    amd = tmp_path / "amd"
    amd.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\n")
    intel = tmp_path / "intel"
    intel.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert "avx2" in cpu_flags(amd) and not {"amx_bf16", "avx512_bf16"} & cpu_flags(amd)
    assert {"amx_bf16", "avx512_bf16"} <= cpu_flags(intel)
    assert cpu_flags(tmp_path / "missing") == set()


def test_benchmarks_name_the_cpu_with_what_decides_auto_precision(tmp_path):
    from features.precision import cpu_description

    amd = tmp_path / "amd"
    amd.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n")
    zen4 = tmp_path / "zen4"
    zen4.write_text("model name\t: AMD EPYC 9B14\nflags\t\t: avx2 avx512f avx512_bf16\n")
    intel = tmp_path / "intel"
    intel.write_text("model name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16\n")
    assert cpu_description(amd) == "AMD EPYC 7B13 (AVX2 only: no native bf16, auto = fp32)"
    assert cpu_description(zen4) == "AMD EPYC 9B14 (AVX512-BF16, no AMX: native bf16, auto = bf16)"
    assert cpu_description(intel).endswith("(AMX-BF16: native bf16, auto = bf16)")
    assert "auto = fp32" in cpu_description(tmp_path / "missing")
