"""Shared benchmark plumbing: the device, CUDA-synchronised timing, peak-memory capture, and
skipping of ``gpu`` benchmarks where there is no CUDA device.

Imports nothing that loads Triton (bench_attention.py must set TRITON_INTERPRET first)."""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Iterator

import pytest
import torch

CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device | str, warmup: int = 2, iters: int = 5
            ) -> dict[str, float]:
    """Wall-clock seconds per call of ``fn`` (synchronised before and after each call on CUDA):
    median, min and mean over ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "mean_s": statistics.fmean(times)}


@contextlib.contextmanager
def peak_memory(device: torch.device | str) -> Iterator[dict[str, float]]:
    """``with peak_memory(dev) as mem: ...`` then mem["peak_mb"] (CUDA max_memory_allocated since
    the reset, i.e. including what was already allocated; 0 on CPU)."""
    out: dict[str, float] = {"peak_mb": 0.0}
    dev = torch.device(device)
    if dev.type == "cuda":
        synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        yield out
    finally:
        if dev.type == "cuda":
            synchronize(dev)
            out["peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if CUDA else "cpu")


@pytest.fixture
def timer():
    """The time_fn helper as a fixture: ``timer(fn, device, warmup, iters)``."""
    return time_fn


@pytest.fixture
def memory():
    """The peak_memory context manager as a fixture: ``with memory(device) as m: ...``."""
    return peak_memory
