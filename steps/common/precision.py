"""The one dtype decision: every step takes `--dtype` (the tier's DTYPE), and "auto" is decided here.

- GPU: bf16 where the GPU has it natively (compute capability >= 8.0), fp16 on older GPUs (a T4). Not
  torch.cuda.is_bf16_supported(): newer torch says True on a T4 through emulation.
- CPU: bf16 only where the processor computes it natively (AVX512-BF16 or AMX). Elsewhere (AVX2: most laptops
  and many cloud VMs) torch's bf16 matmuls ran 46x slower than fp32 (0.9 against 41.8 GFLOP/s on an AVX2 EPYC),
  so fp32. Linux says which through /proc/cpuinfo; elsewhere a short matmul timing decides.

Training takes the same decision as mixed precision (common/training/config.py turns it into the trainer's
--bf16/--fp16 and the dtype the weights load in).
"""

import functools
import os
import sys
import time
from pathlib import Path

import torch

from common import OptionError

NAMES = ("auto", "bfloat16", "float16", "float32")
# oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA) below these turns native bf16 off even where the CPU has it.
_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10", "ALL", "DEFAULT")


def _cpu_flags():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


def _bf16_matmul_ratio():
    """bf16 speed over fp32 speed for a matmul of the embedded model's shapes (about 0.1 s)."""
    def rate(dtype):
        a, b = torch.randn(64, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
        a @ b
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < 0.05:
            a @ b
            n += 1
        return n / elapsed

    return rate(torch.bfloat16) / rate(torch.float32)


@functools.cache
def cpu_bf16():
    """(whether this CPU runs bf16 natively, why) — the flags where Linux shows them, else a timing."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and not isa.startswith(_BF16_ISAS):
        return False, f"ONEDNN_MAX_CPU_ISA={isa} caps oneDNN below native bf16"
    flags = _cpu_flags()
    if flags is not None:
        native = sorted(flags & {"avx512_bf16", "amx_bf16"})
        if native:
            return True, f"the CPU has {' and '.join(native)}"
        return False, "the CPU has neither avx512_bf16 nor amx_bf16 (bf16 would be emulated, ~46x slower than fp32)"
    ratio = _bf16_matmul_ratio()
    return ratio >= 0.5, f"a bf16 matmul ran at {ratio:.2f}x the fp32 speed"


@functools.cache
def decide(name="auto"):
    """The torch dtype for `name` (one of NAMES), printing once per process what "auto" chose and why."""
    if name not in NAMES:
        raise OptionError(f"--dtype {name}: choose one of {', '.join(NAMES)}")
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
        dtype = torch.bfloat16 if capability >= (8, 0) else torch.float16
        why = f"{torch.cuda.get_device_name()} has compute capability {capability[0]}.{capability[1]}"
    else:
        native, why = cpu_bf16()
        dtype = torch.bfloat16 if native else torch.float32
    print(f"dtype auto -> {dtype_name(dtype)}: {why} (DTYPE=... or --dtype overrides)", file=sys.stderr)
    return dtype


def resolve_dtype(name):
    """A torch dtype from a name, a torch dtype, or None/"auto" (decided once per process)."""
    if isinstance(name, torch.dtype):
        return name
    return decide(name or "auto")


def dtype_name(dtype):
    """'bfloat16' for torch.bfloat16 (for settings and reports)."""
    return str(resolve_dtype(dtype)).removeprefix("torch.")

