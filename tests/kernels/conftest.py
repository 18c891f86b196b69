"""Shared setup for the kernel tests: the Triton interpreter on CPU and a backend switch."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must happen before anything imports triton: without a GPU the kernels run interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_backend():
    """Route fastgpt.kernels calls to the Triton implementations for the test's duration."""
    from fastgpt.kernels import backend

    with backend("triton"):
        yield


@pytest.fixture
def poison(monkeypatch):
    """Every fresh torch.empty / empty_like float buffer starts as NaN, so an output element a
    kernel forgets to write (or scratch it reads before writing) surfaces as NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: fill(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: fill(real_empty_like(*a, **kw)))
