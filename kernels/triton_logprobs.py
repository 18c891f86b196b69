"""Triton per-token log-probs and entropy from hidden states and the lm_head weight.

Same chunked scheme as the fused linear cross-entropy (see :mod:`.cross_entropy`, whose
chunking, online log-sum-exp and gradient-GEMM helpers are reused): per row chunk the logits
``hidden_c @ weight.T`` come from cuBLAS and one Triton program per row makes a single online
pass giving lse and sum_j p_j z_j (z = logits / temperature), hence

    log p(target) = z_t - lse,        entropy H = lse - sum_j p_j z_j.

Unlike the cross-entropy, the two outputs are per-token tensors that PPO combines with
arbitrary upstream gradients, so nothing can be pre-computed in forward.  Forward saves only
hidden, weight, targets, lse and sum(p z) (2 floats per token); backward recomputes each chunk's
logits and, with g_lp / g_ent the upstream gradients,

    d z_j = g_lp * ([j == t] - p_j) - g_ent * p_j * (z_j - sum_k p_k z_k)
    d logits = d z / temperature

(dH/dz_j = -p_j (z_j - sum_k p_k z_k) follows from d p_k / d z_j = p_k ([k == j] - p_j)).
Under ``torch.no_grad()`` or when no input requires grad (PPO reference / old-policy passes)
only the forward runs and nothing is saved.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_cross_entropy import (
    LinearGrads,
    _block_v,
    _load_z,
    _num_warps,
    _row_stats,
    _zero_row,
    chunk_rows,
    chunks,
)
from .launch import run
from .reference import flatten_linear_inputs


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, stride_ln, stride_lv,   # (n, V) chunk of logits
    targets_ptr,
    logprob_ptr, entropy_ptr, lse_ptr, spz_ptr,  # (n,) fp32 outputs
    V, inv_temp, ignore_index,
    BLOCK_V: tl.constexpr,
):
    """Per row: log p(target), entropy, and (lse, sum p z) for the backward."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_ln
    target = tl.load(targets_ptr + row).to(tl.int64)
    if target == ignore_index:
        tl.store(logprob_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        tl.store(spz_ptr + row, 0.0)
    else:
        lse, _, spz = _row_stats(row_ptr, stride_lv, V, inv_temp, 1.0, False, False, True,
                                 BLOCK_V)
        z_t = _load_z(row_ptr + target * stride_lv, (target >= 0) & (target < V), inv_temp, 1.0,
                      False)
        tl.store(logprob_ptr + row, z_t - lse)
        tl.store(entropy_ptr + row, lse - spz)
        tl.store(lse_ptr + row, lse)
        tl.store(spz_ptr + row, spz)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, stride_ln,              # (n, V) row-major chunk, overwritten with d logits
    targets_ptr, lse_ptr, spz_ptr,
    g_lp_ptr, stride_glp, g_ent_ptr, stride_gent,
    V, inv_temp, ignore_index,
    BLOCK_V: tl.constexpr,
):
    """d logits = inv_temp * (g_lp * (1[j=t] - p) - g_ent * p * (z - sum p z)), in place."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_ln
    target = tl.load(targets_ptr + row).to(tl.int64)
    if target == ignore_index:
        _zero_row(row_ptr, V, BLOCK_V)
    else:
        lse = tl.load(lse_ptr + row)
        spz = tl.load(spz_ptr + row)
        g_lp = tl.load(g_lp_ptr + row * stride_glp).to(tl.float32)
        g_ent = tl.load(g_ent_ptr + row * stride_gent).to(tl.float32)
        offs = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            z = _load_z(row_ptr + cols, mask, inv_temp, 1.0, False)
            p = tl.exp(z - lse)
            zc = tl.where(mask, z, 0.0)
            dz = tl.where(cols == target, g_lp, 0.0) - p * (g_lp + g_ent * (zc - spz))
            tl.store(row_ptr + cols, (dz * inv_temp).to(logits_ptr.dtype.element_ty), mask=mask)


def _forward(hidden, weight, targets, temperature, ignore_index, rows):
    n, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    logprobs, entropy, lse, spz = (torch.empty(n, dtype=torch.float32, device=dev)
                                   for _ in range(4))
    block = _block_v(V)
    for sl in chunks(n, rows):
        logits = hidden[sl] @ weight.t()
        run(_logprobs_fwd_kernel, (sl.stop - sl.start,),
            logits, logits.stride(0), logits.stride(1), targets[sl],
            logprobs[sl], entropy[sl], lse[sl], spz[sl],
            V, 1.0 / temperature, ignore_index, BLOCK_V=block, num_warps=_num_warps(block))
    return logprobs, entropy, lse, spz


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, rows, weight_grad_fp32):
        logprobs, entropy, lse, spz = _forward(hidden, weight, targets, temperature,
                                               ignore_index, rows)
        ctx.save_for_backward(hidden, weight, targets, lse, spz)
        ctx.args = (temperature, ignore_index, rows, weight_grad_fp32)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, targets, lse, spz = ctx.saved_tensors
        temperature, ignore_index, rows, weight_grad_fp32 = ctx.args
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_lp, g_ent = g_lp.float(), g_ent.float()
        grads = LinearGrads(hidden, weight, need_h, need_w, weight_grad_fp32)
        block = _block_v(weight.shape[0])
        for sl in chunks(hidden.shape[0], rows):
            logits = hidden[sl] @ weight.t()
            gl, ge = g_lp[sl], g_ent[sl]
            run(_logprobs_bwd_kernel, (sl.stop - sl.start,),
                logits, logits.stride(0), targets[sl], lse[sl], spz[sl],
                gl, gl.stride(0), ge, ge.stride(0),
                weight.shape[0], 1.0 / temperature, ignore_index,
                BLOCK_V=block, num_warps=_num_warps(block))
            grads.add_chunk(sl, logits)
        grad_hidden, grad_weight = grads.result()
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_logprobs_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           temperature: float = 1.0, ignore_index: int = -100, *,
                           weight_grad_fp32: bool = True, chunk_size: int | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`reference.linear_logprobs_reference`: (log p(target), entropy), both fp32.

    hidden (..., d), weight (V, d), targets (...); outputs have targets' shape.  Gradients of
    both outputs flow to hidden and weight (chunk logits recomputed in backward).
    ``weight_grad_fp32`` and ``chunk_size``: as in
    :func:`.cross_entropy.linear_cross_entropy_triton`.
    """
    h2, t1 = flatten_linear_inputs(hidden, weight, targets)
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows = chunk_rows(h2.shape[0], weight.shape[0], hidden.dtype, chunk_size)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        logprobs, entropy = _LinearLogprobs.apply(h2, weight, t1, float(temperature),
                                                  ignore_index, rows, weight_grad_fp32)
    else:
        logprobs, entropy, _, _ = _forward(h2, weight, t1, float(temperature), ignore_index,
                                           rows)
    return logprobs.view(targets.shape), entropy.view(targets.shape)
