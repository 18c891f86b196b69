"""Plain PyTorch references: the specification of every fused kernel.

Each function here has exactly the signature and semantics of its Triton counterpart. They
are what the CPU path runs, what the tests compare against and what the benchmarks call the
"eager reference".  They favour clarity over speed: the losses materialise full-vocabulary
logits, attention builds its full (T x T) mask.  All softmax / log-sum-exp math is done in fp32.

Shapes (flash-attn conventions):
    q           (B, T, Hq, D)  or packed (N, Hq, D) together with ``cu_seqlens``
    k, v        (B, T, Hkv, D) or packed (N, Hkv, D); Hq % Hkv == 0 (grouped-query attention)
    cu_seqlens  int32 (S + 1,), offsets of S sequences into the flattened B*T (or N) tokens
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------ argument contracts
# Shared by the references and the Triton wrappers so both backends accept and reject exactly
# the same inputs.
REDUCTIONS = ("mean", "sum", "none")


def check_loss_args(targets: torch.Tensor, n: int, reduction: str, label_smoothing: float,
                    z_loss: float, softcap: float | None) -> None:
    """Validate the cross-entropy options for ``n`` rows of logits."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if targets.shape != (n,):
        raise ValueError(f"targets must have shape ({n},), got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if softcap is not None and softcap <= 0.0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")


def check_logits_args(logits: torch.Tensor, targets: torch.Tensor, reduction: str,
                      label_smoothing: float, z_loss: float, softcap: float | None) -> None:
    """Validate (N, V) logits with (N,) targets and the cross-entropy options."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if targets.device != logits.device:
        raise ValueError("logits and targets must be on the same device")
    check_loss_args(targets, logits.shape[0], reduction, label_smoothing, z_loss, softcap)


def flatten_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate (..., d) hidden / (V, d) weight / (...) targets; return 2-D hidden, 1-D targets."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, d), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., d) and weight (V, d) disagree on d: "
                         f"{tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if not hidden.dtype.is_floating_point:
        raise TypeError(f"hidden must be floating point, got {hidden.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight dtypes differ: {hidden.dtype} vs {weight.dtype}")
    if hidden.device != weight.device or targets.device != hidden.device:
        raise ValueError("hidden, weight and targets must be on the same device")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden's leading "
                         f"shape {tuple(hidden.shape[:-1])}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)


# ----------------------------------------------------------------------------- attention
def _sequence_ids(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Index of the sequence each of the ``n_tokens`` flattened tokens belongs to."""
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n_tokens:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at the number of tokens ({n_tokens}), "
            f"got {int(cu_seqlens[0])}..{int(cu_seqlens[-1])}")
    positions = torch.arange(n_tokens, device=cu_seqlens.device, dtype=torch.int32)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        softmax_scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                        max_seqlen: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, per head, with GQA and packed variable-length batches.

    With ``cu_seqlens`` no token attends to a token of another sequence. For a (B, T, ...)
    input every row must start a new sequence (b * T is in ``cu_seqlens``) -- this reference
    builds its mask per row. ``max_seqlen`` is accepted for API parity and unused here.
    The math runs in fp32 through ``F.scaled_dot_product_attention`` with an explicit boolean
    mask (its math is exactly this formula; on CPU it is the fast path the CPU training uses).
    """
    packed = q.dim() == 3
    if packed:
        if cu_seqlens is None:
            raise ValueError("packed (N, H, D) attention inputs need cu_seqlens")
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)

    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    kf = kf.repeat_interleave(Hq // Hkv, dim=1)
    vf = vf.repeat_interleave(Hq // Hkv, dim=1)

    allowed = None  # (B, T, T) or None for "every key" / plain causal
    if cu_seqlens is not None:
        seq = _sequence_ids(cu_seqlens, B * T).view(B, T)
        if B > 1 and bool((seq[1:, 0] == seq[:-1, -1]).any()):
            raise ValueError("with a (B, T) input every row must start a sequence in cu_seqlens")
        allowed = seq[:, :, None] == seq[:, None, :]
        if causal:
            allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if allowed is None:
        out = F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=allowed[:, None], scale=scale)
    out = out.transpose(1, 2).to(q.dtype)
    return out.squeeze(0) if packed else out


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               cache_seqlens: torch.Tensor, softmax_scale: float | None = None,
                               cache_batch_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of a few new queries against a KV cache (the generation decode step).

    q (B, Tq, Hq, D); k_cache, v_cache (Bc, Tmax, Hkv, D) already hold the Tq new keys/values.
    cache_seqlens int32 (B,): valid cache length of query row b *including* its Tq new tokens,
    so query i of row b sits at position cache_seqlens[b] - Tq + i and sees keys 0..that position.
    cache_batch_idx int32 (B,) optional: which cache row each query row reads (default b).
    """
    B, Tq, Hq, D = q.shape
    if q.device.type == "cpu":
        # Read only the filled part of the cache: on the CPU (where this reference serves generation)
        # gathering all Tmax positions of every row each step cost more than the attention itself.
        # Not on CUDA: the length is a host sync there, which a captured CUDA graph cannot hold.
        used = int(cache_seqlens.max())
        k_cache, v_cache = k_cache[:, :used], v_cache[:, :used]
    if cache_batch_idx is not None:
        k_cache, v_cache = k_cache[cache_batch_idx.long()], v_cache[cache_batch_idx.long()]
    Tmax, Hkv = k_cache.shape[1], k_cache.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qf = q.float().transpose(1, 2)  # (B, Hq, Tq, D)
    kf, vf = k_cache.float().transpose(1, 2), v_cache.float().transpose(1, 2)
    if Hq != Hkv:
        kf, vf = kf.repeat_interleave(Hq // Hkv, dim=1), vf.repeat_interleave(Hq // Hkv, dim=1)
    scores = qf @ kf.transpose(-1, -2) * scale  # (B, Hq, Tq, Tmax)
    query_pos = cache_seqlens.long()[:, None] - Tq + torch.arange(Tq, device=q.device)  # (B, Tq)
    key_pos = torch.arange(Tmax, device=q.device)
    allowed = key_pos[None, None, :] <= query_pos[:, :, None]  # (B, Tq, Tmax)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vf
    return out.transpose(1, 2).to(q.dtype)


# ------------------------------------------------------------------------- cross-entropy
def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                            reduction: str = "mean", label_smoothing: float = 0.0,
                            z_loss: float = 0.0, softcap: float | None = None) -> torch.Tensor:
    """Token-level cross-entropy on (N, V) logits, computed in fp32.

    Per token (targets != ignore_index), with z = logits (soft-capped: softcap * tanh(z / softcap)):
        lse  = logsumexp(z)
        loss = (1 - eps) * (lse - z[target]) + eps * (lse - mean(z)) + z_loss * lse**2
    Ignored tokens contribute 0. reduction: "none" -> (N,) fp32, "sum", or "mean" over the
    non-ignored tokens; "mean" with every target ignored is 0 (with zero gradients), not NaN.
    """
    check_logits_args(logits, targets, reduction, label_smoothing, z_loss, softcap)
    z = logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
    lse = torch.logsumexp(z, dim=-1)
    nll = lse - z.gather(-1, safe_targets[:, None]).squeeze(-1)
    loss = nll
    if label_smoothing > 0.0:
        loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - z.mean(dim=-1))
    if z_loss > 0.0:
        loss = loss + z_loss * lse.square()
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100, reduction: str = "mean",
                                   label_smoothing: float = 0.0, z_loss: float = 0.0,
                                   softcap: float | None = None) -> torch.Tensor:
    """cross_entropy_reference(hidden @ weight.T, ...) over every leading position.

    hidden (..., d), weight (V, d), targets (...): the leading dimensions are flattened into
    tokens, so "mean" averages over all non-ignored tokens and "none" returns targets' shape.
    """
    h2, t1 = flatten_linear_inputs(hidden, weight, targets)
    loss = cross_entropy_reference(h2 @ weight.t(), t1, ignore_index, reduction, label_smoothing,
                                   z_loss, softcap)
    return loss.view(targets.shape) if reduction == "none" else loss


# ------------------------------------------------------------------------------ log-probs
def linear_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              temperature: float = 1.0, ignore_index: int = -100
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(target) and entropy of softmax(hidden @ weight.T / temperature).

    hidden (..., d), weight (V, d), targets (...) -> (logprobs, entropy), both fp32 with
    targets' shape. Tokens whose target is ignore_index get 0 for both (and no gradient).
    """
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shape = targets.shape
    hidden, targets = flatten_linear_inputs(hidden, weight, targets)
    z = (hidden @ weight.t()).float() / temperature
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = torch.log_softmax(z, dim=-1)
    logprobs = logp.gather(-1, safe_targets[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    zero = torch.zeros_like(logprobs)
    return (torch.where(valid, logprobs, zero).view(shape),
            torch.where(valid, entropy, zero).view(shape))
