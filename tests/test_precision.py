"""The one dtype decision (steps/common/precision.py): what "auto" picks on which CPU, and how training takes it."""

import pytest
import torch
from conftest import REPO

from common import OptionError, precision
from common.training.config import training_flags

CPU_SFT = REPO / "env/cpu/sft.yaml"


@pytest.fixture
def fresh(monkeypatch):
    """Forget the per-process decision, so each case decides anew; no oneDNN cap from the environment."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    precision.cpu_bf16.cache_clear()
    precision.decide.cache_clear()
    yield monkeypatch
    precision.cpu_bf16.cache_clear()
    precision.decide.cache_clear()


@pytest.mark.parametrize("flags, native", [
    ({"avx2", "avx512f", "avx512_bf16"}, True),
    ({"avx2", "amx_bf16", "amx_tile"}, True),
    ({"avx2", "fma", "avx512f", "avx512bw"}, False),  # AVX512 without BF16: emulated
    ({"avx2", "fma"}, False),
])
def test_auto_picks_bf16_only_on_cpus_that_compute_it_natively(fresh, flags, native, capsys):
    fresh.setattr(precision, "_cpu_flags", lambda: flags)
    fresh.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.resolve_dtype("auto") == (torch.bfloat16 if native else torch.float32)
    printed = capsys.readouterr().err
    assert f"dtype auto -> {'bfloat16' if native else 'float32'}" in printed  # the choice is printed, with why
    assert ("avx512_bf16" in printed) or ("amx_bf16" in printed)
    precision.resolve_dtype("auto")
    assert capsys.readouterr().err == ""  # once per process


def test_a_onednn_isa_cap_below_bf16_means_fp32(fresh):
    fresh.setattr(precision, "_cpu_flags", lambda: {"avx512_bf16", "amx_bf16"})
    fresh.setattr(torch.cuda, "is_available", lambda: False)
    fresh.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert precision.resolve_dtype("auto") == torch.float32


def test_without_cpu_flags_a_timing_decides(fresh):
    fresh.setattr(precision, "_cpu_flags", lambda: None)
    fresh.setattr(torch.cuda, "is_available", lambda: False)
    fresh.setattr(precision, "_bf16_matmul_ratio", lambda: 1 / 46)
    assert precision.resolve_dtype("auto") == torch.float32
    precision.cpu_bf16.cache_clear(), precision.decide.cache_clear()
    fresh.setattr(precision, "_bf16_matmul_ratio", lambda: 1.3)
    assert precision.resolve_dtype("auto") == torch.bfloat16
    assert 0 < precision._bf16_matmul_ratio()  # the real timing runs


def test_explicit_names_pass_through_and_bad_ones_name_the_option():
    assert precision.resolve_dtype("float16") == torch.float16
    assert precision.resolve_dtype(torch.bfloat16) == torch.bfloat16
    assert precision.dtype_name("float32") == "float32"
    with pytest.raises(OptionError, match="--dtype half: choose one of auto, bfloat16, float16, float32"):
        precision.resolve_dtype("half")


@pytest.mark.parametrize("dtype, bf16, fp16", [("float32", False, False), ("bfloat16", True, False),
                                               ("float16", False, True)])
def test_training_takes_the_same_decision_as_mixed_precision(dtype, bf16, fp16):
    """The trainer's bf16/fp16 follow --dtype whatever the YAML or TRL's defaults say (TRL turns bf16 on unless
    told), and on a CPU the weights load in fp32 under autocast."""
    from sft import parse

    _, args, model_args = parse(["--config", str(CPU_SFT), "--model_name_or_path", "m", "--train_file", "x",
                                 "--output_dir", "o", "--bf16", "true", "--dtype", dtype])
    assert (args.bf16, args.fp16) == (bf16, fp16)
    assert args.mixed_precision == {(True, False): "bf16", (False, True): "fp16"}.get((bf16, fp16), "no")
    assert model_args.dtype == "float32"


def test_training_without_dtype_decides_auto(fresh):
    from sft import parse

    fresh.setattr(precision, "_cpu_flags", lambda: {"avx2"})
    fresh.setattr(torch.cuda, "is_available", lambda: False)
    _, args, _ = parse(["--config", str(CPU_SFT), "--model_name_or_path", "m", "--train_file", "x", "--output_dir", "o"])
    assert (args.bf16, args.fp16) == (False, False)


@pytest.mark.parametrize("gpu, capability, dtype", [("Tesla T4", (7, 5), torch.float16),
                                                    ("NVIDIA A100-SXM4-40GB", (8, 0), torch.bfloat16),
                                                    ("NVIDIA H100 80GB HBM3", (9, 0), torch.bfloat16)])
def test_auto_on_a_gpu_follows_its_compute_capability(fresh, capsys, gpu, capability, dtype):
    """bf16 from compute capability 8.0 (Ampere) up, fp16 below (a T4), whatever torch.cuda.is_bf16_supported() says
    (newer torch says True on a T4, through emulation); the weights load in it and the trainer mixes in it."""
    fresh.setattr(torch.cuda, "is_available", lambda: True)
    fresh.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    fresh.setattr(torch.cuda, "get_device_name", lambda *a: gpu)
    fresh.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    fresh.setattr(precision, "_cpu_flags", lambda: pytest.fail("a GPU host asked about its CPU"))
    assert precision.resolve_dtype("auto") == dtype
    assert f"dtype auto -> {precision.dtype_name(dtype)}: {gpu} has compute capability" in capsys.readouterr().err
    flags = training_flags(["--config", str(CPU_SFT)])
    name = precision.dtype_name(dtype)
    assert flags[-6:] == ["--dtype", name, "--bf16", str(name == "bfloat16").lower(), "--fp16",
                          str(name == "float16").lower()]
