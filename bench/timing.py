"""Timing GPU work: the benchmarks' one helper for it."""

import time

import torch


def sync_time(fn):
    """(fn's result, seconds it took), measured between CUDA synchronisations so that queued kernels count."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start
