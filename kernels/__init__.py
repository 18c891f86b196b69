"""fastgpt.kernels: fused attention, cross-entropy and per-token log-probs.

The bottom floor of fastgpt: pure tensor functions that import nothing from the rest of the
package.  Each public function below has a Triton implementation (forward and backward) and a
plain PyTorch reference with the same signature (``reference.py``, the spec).  Which one runs is
decided in one place, :mod:`fastgpt.kernels.dispatch`: CUDA tensors use Triton, CPU tensors use
the reference, unless ``FASTGPT_KERNELS`` / :func:`set_backend` says otherwise.

The Triton modules are imported lazily so that ``import fastgpt`` works where Triton is absent.
"""
from __future__ import annotations

import torch

from .dispatch import backend, get_backend, set_backend, use_triton
from .reference import (
    attention_reference,
    cross_entropy_reference,
    decode_attention_reference,
    linear_cross_entropy_reference,
    linear_logprobs_reference,
)

__all__ = [
    "attention", "decode_attention", "cross_entropy", "linear_cross_entropy", "linear_logprobs",
    "backend", "get_backend", "set_backend", "use_triton",
]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              softmax_scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
              max_seqlen: int | None = None) -> torch.Tensor:
    """Fused (FlashAttention-style) attention. See :func:`reference.attention_reference`."""
    if use_triton(q):
        from .triton_attention import attention_triton
        return attention_triton(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen)
    return attention_reference(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_seqlens: torch.Tensor, softmax_scale: float | None = None,
                     cache_batch_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of a few new queries against a KV cache. See :func:`reference.decode_attention_reference`."""
    if use_triton(q):
        from .triton_decode import decode_attention_op, decode_attention_triton
        if torch.compiler.is_compiling():  # one opaque op in the traced graph
            return decode_attention_op(q, k_cache, v_cache, cache_seqlens, softmax_scale,
                                       cache_batch_idx)
        return decode_attention_triton(q, k_cache, v_cache, cache_seqlens, softmax_scale,
                                       cache_batch_idx)
    return decode_attention_reference(q, k_cache, v_cache, cache_seqlens, softmax_scale,
                                      cache_batch_idx)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: float | None = None) -> torch.Tensor:
    """Cross-entropy on (N, V) logits. See :func:`reference.cross_entropy_reference`."""
    if use_triton(logits):
        from .triton_cross_entropy import cross_entropy_triton
        return cross_entropy_triton(logits, targets, ignore_index, reduction, label_smoothing,
                                    z_loss, softcap)
    return cross_entropy_reference(logits, targets, ignore_index, reduction, label_smoothing,
                                   z_loss, softcap)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: float | None = None) -> torch.Tensor:
    """lm_head matmul fused with cross-entropy; the (N, V) logits never exist in full on the
    Triton path. See :func:`reference.linear_cross_entropy_reference`."""
    if use_triton(hidden):
        from .triton_cross_entropy import linear_cross_entropy_triton
        return linear_cross_entropy_triton(hidden, weight, targets, ignore_index, reduction,
                                           label_smoothing, z_loss, softcap)
    return linear_cross_entropy_reference(hidden, weight, targets, ignore_index, reduction,
                                          label_smoothing, z_loss, softcap)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0, ignore_index: int = -100
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (log p(target), entropy) from hidden states and the lm_head weight.
    See :func:`reference.linear_logprobs_reference`."""
    if use_triton(hidden):
        from .triton_logprobs import linear_logprobs_triton
        return linear_logprobs_triton(hidden, weight, targets, temperature, ignore_index)
    return linear_logprobs_reference(hidden, weight, targets, temperature, ignore_index)
