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


def gpu_slug(name=None):
    """The GPU's name as a results file takes it: "NVIDIA H200" -> "h200"."""
    name = name or torch.cuda.get_device_name()
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
