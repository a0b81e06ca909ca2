"""Timing GPU work, and naming the GPU it ran on: the benchmarks' helpers for both."""

import re
import time

import torch


def sync_time(fn):
    """(fn's result, seconds it took), measured between CUDA synchronisations so that queued kernels count."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


FAMILIES = ("H200", "H100", "A100", "A10", "L4", "T4")  # GPUs named by their family alone


def gpu_slug(name):
    """The GPU's name as a results file takes it: its family where it is one of FAMILIES ("NVIDIA H100 80GB HBM3" ->
    "h100"), else the whole name made file-safe ("NVIDIA RTX 6000 Ada Generation" -> "rtx-6000-ada-generation")."""
    family = next((f for f in FAMILIES if re.search(rf"\b{f}\b", name)), None)
    return family.lower() if family else re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
