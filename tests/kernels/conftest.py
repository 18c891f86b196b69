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
