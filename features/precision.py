"""Which precision is fast on the device a model runs on: ``precision: auto`` resolved per worker.

On CUDA: bf16 where the GPU supports it (Ampere and newer), else fp16. On a CPU: bf16 only where
the CPU computes it natively (x86 AMX-BF16 or AVX512-BF16); elsewhere torch emulates bf16 and
autocast is several times *slower* than fp32 (measured: ViT-S/16 on an AVX2-only AMD EPYC, 0.53 vs
2.67 patches/s on one thread), so fp32. Explicit ``fp32`` / ``bf16`` / ``fp16`` always win.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

Precision = Literal["auto", "fp32", "bf16", "fp16"]
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 arithmetic in hardware


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (x86 ``flags``, ARM ``Features``), empty where /proc/cpuinfo does not exist."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AMX or AVX512-BF16), so bf16 autocast is a speed-up."""
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """This CPU's model and what decides ``precision: auto`` and speed on it, for benchmarks to print beside their
    figures: e.g. ``AMD EPYC (AVX2 only: no native bf16, auto = fp32)``."""
    import platform

    model = platform.processor() or platform.machine() or "unknown CPU"
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags(cpuinfo)
    native = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]  # the rule resolve_precision follows
    if native:
        name = native[0].upper().replace("_", "-")
        kind = f"{name}{'' if 'amx_bf16' in flags else ', no AMX'}: native bf16, auto = bf16"
    elif "avx512f" in flags:
        kind = "AVX-512 without BF16: auto = fp32"
    elif "avx2" in flags:
        kind = "AVX2 only: no native bf16, auto = fp32"
    else:
        kind = "no native bf16 flag: auto = fp32"
    return f"{model} ({kind})"


def resolve_precision(precision: Precision, device) -> Literal["fp32", "bf16", "fp16"]:
    """The precision to run at on ``device`` (a torch.device or its type name)."""
    if precision != "auto":
        return precision
    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"  # mps and others: fp32 is the safe choice


def autocast_dtype(precision: str):
    """The torch dtype autocast runs at for a resolved precision (None: no autocast)."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
