"""pytest plumbing for the benchmark files: ``benchmarks/`` on the import path (for
:mod:`measure`, the timing and memory helpers every benchmark shares) and skipping of ``gpu``
benchmarks where there is no CUDA device.

Imports nothing that loads Triton (the benchmark files set TRITON_INTERPRET first on a CPU)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

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
