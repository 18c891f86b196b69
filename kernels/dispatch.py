"""The one switch that chooses between the Triton kernels and the PyTorch references.

Rule: CUDA tensors run the Triton kernels; CPU tensors run the references, unless the user
asks otherwise.  The choice comes from one place only:

* ``FASTGPT_KERNELS`` environment variable, read once at import: ``auto`` (default),
  ``triton`` (always Triton; on CPU this needs ``TRITON_INTERPRET=1`` set before triton is
  imported) or ``reference`` (always the plain PyTorch reference);
* :func:`set_backend` / the :func:`backend` context manager, which override it at run time.

Every public kernel function asks :func:`use_triton` with its main input tensor and nothing else.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "reference")


def _from_env() -> str:
    name = os.environ.get("FASTGPT_KERNELS", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTGPT_KERNELS={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


_backend = _from_env()


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    """Choose ``auto``, ``triton`` or ``reference`` for every kernel call that follows."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r}: expected one of {', '.join(BACKENDS)}")
    _backend = name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Temporarily use another backend: ``with backend("triton"): ...``."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_triton(x: torch.Tensor) -> bool:
    """True when the call on tensor ``x`` should run the Triton kernel."""
    if _backend == "reference":
        return False
    if _backend == "triton":
        return True
    return x.is_cuda
