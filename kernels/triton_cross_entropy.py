"""Triton cross-entropy on (N, V) logits and fused lm_head + cross-entropy.

Kernels
-------
``_ce_kernel`` runs one program per row.  Pass 1 walks the vocabulary in ``BLOCK_V`` blocks with an
online max / sum-exp (plus sum(z) for label smoothing), so a row of any length needs only one
block of registers.  Pass 2, when a gradient is wanted, walks the row again and writes
d loss / d logits in the same launch (Liger-style): the loss is a sum of per-row terms, so the
gradient can be formed in forward and merely scaled by the upstream gradient in backward.  All
math is fp32 whatever the storage dtype; the true-class term ``p - 1`` is formed in fp32 and the
result rounded once on store.  Row and column offsets are int64 (``row * V`` passes 2**31 at
N*V > 2**31, e.g. 16k tokens x 128k vocabulary).

Gradient per valid row, z = softcap(x) = c * tanh(x / c) (identity without a softcap):
    d loss / d z_j = p_j * (1 + 2 * z_loss * lse) - (1 - eps) * [j == t] - eps / V
    d z / d x      = 1 - (z / c)**2
times ``scale`` (1 / n_valid for "mean", 1 for "sum"; the per-row upstream gradient when
recomputed in backward).  Ignored rows get loss 0 and a zero gradient row.

Fused linear cross-entropy: chunking and matmul choice
------------------------------------------------------
Tokens are processed in row chunks.  Per chunk ``logits = hidden_c @ weight.T`` is a plain
``torch.matmul`` (cuBLAS): a d x V GEMM at these sizes already runs at ~peak tensor-core
throughput and a hand-written Triton GEMM would only match it, not beat it; fusing the softmax
into the GEMM epilogue is impossible anyway because each row needs the max over the full V
before any gradient element is known.  ``_ce_kernel`` then overwrites the chunk's logits in
place with d(loss)/d(logits), and two more cuBLAS GEMMs give
``grad_hidden_c = dlogits @ weight`` and ``grad_weight += dlogits.T @ hidden_c``.

The chunk holds ``chunk_rows * V`` logits; ``chunk_rows`` is chosen so that buffer stays under
``_CHUNK_BYTES`` (256 MiB: ~1024 rows for V = 128k in bf16), rounded down to a multiple of 128
rows so the GEMMs keep tensor-core friendly shapes.  Peak extra memory is therefore one chunk
of logits plus grad_hidden (N, d) and the grad_weight accumulator (V, d) -- never N x V.

The weight gradient is accumulated in fp32 by default for 16-bit weights: each chunk's
partial product is one cuBLAS call (fp32 accumulate inside, one rounding) and the running sum
over chunks lives in fp32; summing dozens of chunks in bf16 visibly drifts.

reduction="none" cannot be pre-scaled in forward (grad_weight mixes rows, so the per-row upstream
gradient must be applied before the ``dlogits.T @ hidden`` GEMM), so that case saves its inputs
and recomputes the chunks in backward.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch
import triton
import triton.language as tl

from .launch import run
from .reference import check_logits_args, check_loss_args, flatten_linear_inputs

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Under the CPU interpreter every op is a numpy call on the whole block: small blocks keep the
# tests fast and make them walk several blocks per row.
_MAX_BLOCK_V = 64 if _INTERPRET else 4096
_CHUNK_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------- device helpers
@triton.jit
def _tanh(y):
    # From exp: portable to the CPU interpreter (libdevice.tanh is not) and overflow-free,
    # since exp(-2|y|) <= 1.
    e = tl.exp(-2.0 * tl.abs(y))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(y < 0, -t, t)


@triton.jit
def _load_z(ptrs, mask, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr):
    """Logits as fp32 ``z = softcap(x / temperature)``; masked lanes are -inf."""
    z = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
    if HAS_SOFTCAP:
        # tanh(-inf) = -1 would turn masked lanes into -softcap: mask again.
        z = tl.where(mask, softcap * _tanh(z / softcap), float("-inf"))
    return z


@triton.jit
def _row_stats(row_ptr, stride_v, V, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr,
               NEED_SUM_Z: tl.constexpr, NEED_SUM_PZ: tl.constexpr, BLOCK_V: tl.constexpr):
    """One online pass over a row: (lse, sum_j z_j, sum_j p_j z_j).

    Running max ``m`` and ``s = sum exp(z - m)`` (and ``w = sum exp(z - m) * z`` for the
    entropy) are rescaled by exp(m_old - m_new) whenever the max grows.  The sums that are not
    asked for stay 0 and cost nothing (constexpr flags).
    """
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    w = tl.zeros((), tl.float32)
    sum_z = tl.zeros((), tl.float32)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        z = _load_z(row_ptr + cols.to(tl.int64) * stride_v, mask, inv_temp, softcap, HAS_SOFTCAP)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        s = s * alpha + tl.sum(e, axis=0)
        # Masked lanes are -inf: 0 * -inf would be NaN, so they are zeroed explicitly.
        z0 = tl.where(mask, z, 0.0)
        if NEED_SUM_PZ:
            w = w * alpha + tl.sum(e * z0, axis=0)
        if NEED_SUM_Z:
            sum_z += tl.sum(z0, axis=0)
        m = m_new
    lse = m + tl.log(s)
    return lse, sum_z, w / s


@triton.jit
def _zero_row(grad_row_ptr, V, BLOCK_V: tl.constexpr):
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        tl.store(grad_row_ptr + cols, tl.zeros((BLOCK_V,), tl.float32)
                 .to(grad_row_ptr.dtype.element_ty), mask=cols < V)


# ---------------------------------------------------------------------------------- kernel
@triton.jit
def _ce_kernel(
    logits_ptr, stride_ln, stride_lv,   # (N, V) any dtype, any strides
    targets_ptr,                        # (N,) int
    grad_ptr, stride_gn,                # (N, V) row-major gradient out (may alias logits)
    loss_ptr, lse_ptr,                  # (N,) fp32 outputs
    scale_ptr, stride_scale,            # gradient scale: stride 0 = one scalar, else per row
    V, ignore_index, label_smoothing, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per-row loss and lse; with WRITE_GRAD also scale * d loss / d logits."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_ln
    grad_row_ptr = grad_ptr + row * stride_gn
    target = tl.load(targets_ptr + row).to(tl.int64)
    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if WRITE_GRAD:
            _zero_row(grad_row_ptr, V, BLOCK_V)
    else:
        lse, sum_z, _ = _row_stats(row_ptr, stride_lv, V, 1.0, softcap, HAS_SOFTCAP,
                                   HAS_SMOOTHING, False, BLOCK_V)
        # Out-of-range targets read nothing (z_t = -inf -> loss inf) instead of stray memory.
        z_t = _load_z(row_ptr + target * stride_lv, (target >= 0) & (target < V), 1.0, softcap,
                      HAS_SOFTCAP)
        loss = lse - z_t
        if HAS_SMOOTHING:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_z / V)
        if HAS_Z_LOSS:
            loss += z_loss * lse * lse
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)
        if WRITE_GRAD:
            scale = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
            p_coef = scale
            if HAS_Z_LOSS:
                p_coef = scale * (1.0 + 2.0 * z_loss * lse)
            t_coef = scale
            u_coef = 0.0
            if HAS_SMOOTHING:
                t_coef = scale * (1.0 - label_smoothing)
                u_coef = scale * label_smoothing / V
            offs = tl.arange(0, BLOCK_V)
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                mask = cols < V
                z = _load_z(row_ptr + cols.to(tl.int64) * stride_lv, mask, 1.0, softcap,
                            HAS_SOFTCAP)
                dz = p_coef * tl.exp(z - lse) - tl.where(cols == target, t_coef, 0.0) - u_coef
                if HAS_SOFTCAP:
                    zc = tl.where(mask, z, 0.0) / softcap
                    dz = dz * (1.0 - zc * zc)
                tl.store(grad_row_ptr + cols, dz.to(grad_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------- launchers
def _block_v(V: int) -> int:
    return min(_MAX_BLOCK_V, triton.next_power_of_2(V))


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def _launch_ce(logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor, lse: torch.Tensor,
               grad: torch.Tensor | None, scale: torch.Tensor, ignore_index: int,
               label_smoothing: float, z_loss: float, softcap: float | None) -> None:
    """Run ``_ce_kernel`` on rows of ``logits``; ``grad`` may be ``logits`` itself (in place)."""
    n, V = logits.shape
    if n == 0:
        return
    block = _block_v(V)
    write_grad = grad is not None
    if grad is None:
        grad = loss  # never written (WRITE_GRAD=False): any valid pointer
    run(_ce_kernel, (n,),
        logits, logits.stride(0), logits.stride(1), targets,
        grad, grad.stride(0) if write_grad else 0, loss, lse,
        scale, scale.stride(0) if scale.dim() else 0,
        V, ignore_index, float(label_smoothing), float(z_loss),
        float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_Z_LOSS=z_loss > 0.0, WRITE_GRAD=write_grad, BLOCK_V=block,
        num_warps=_num_warps(block),
    )


def _grad_scale(targets: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """0-d fp32 factor on the per-row gradient: 1 / n_valid for "mean" (on device, no sync)."""
    if reduction == "mean":
        n_valid = (targets != ignore_index).sum().clamp(min=1)
        return n_valid.to(torch.float32).reciprocal()
    return torch.ones((), dtype=torch.float32, device=targets.device)


def _reduce(loss: torch.Tensor, scale: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    return total * scale if reduction == "mean" else total


def chunk_rows(n: int, V: int, dtype: torch.dtype, chunk_size: int | None = None) -> int:
    """Rows per chunk so that one chunk of (rows, V) logits stays under ``_CHUNK_BYTES``."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    rows = max(1, _CHUNK_BYTES // (V * dtype.itemsize))
    if rows >= 128:
        rows -= rows % 128
    return max(1, min(n, rows))


def chunks(n: int, rows: int) -> Iterator[slice]:
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


# --------------------------------------------------------------------- cross-entropy (N, V)
class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, label_smoothing, z_loss, softcap):
        n = logits.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(loss)
        scale = _grad_scale(targets, ignore_index, reduction)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _launch_ce(logits, targets, loss, lse, grad, scale, ignore_index, label_smoothing,
                   z_loss, softcap)
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        ctx.used = False
        return _reduce(loss, scale, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.used:
            raise RuntimeError("cross_entropy_triton: backward through the same graph twice is "
                               "not supported (the stored gradient is scaled in place)")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        # In place: the stored N x V gradient is the largest buffer here; a copy would double it.
        grad.mul_(grad_out[:, None] if ctx.reduction == "none" else grad_out)
        return grad, None, None, None, None, None, None


def cross_entropy_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, softcap: float | None = None) -> torch.Tensor:
    """Triton :func:`reference.cross_entropy_reference` on (N, V) logits (any strides).

    The gradient is written during forward (one N x V buffer in the logits dtype) and scaled
    in place in backward, so backward may run only once per graph.
    """
    check_logits_args(logits, targets, reduction, label_smoothing, z_loss, softcap)
    if not (torch.is_grad_enabled() and logits.requires_grad):
        loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        scale = _grad_scale(targets, ignore_index, reduction)
        _launch_ce(logits, targets, loss, torch.empty_like(loss), None, scale, ignore_index,
                   label_smoothing, z_loss, softcap)
        return _reduce(loss, scale, reduction)
    return _CrossEntropy.apply(logits, targets, ignore_index, reduction, label_smoothing,
                               z_loss, softcap)


# ------------------------------------------------------------- fused linear cross-entropy
def _linear_ce_pass(hidden, weight, targets, scale, ignore_index, label_smoothing, z_loss,
                    softcap, rows, need_hidden_grad, need_weight_grad, weight_grad_fp32,
                    loss=None):
    """Chunked logits -> loss (into ``loss`` if given) and scale * gradients.

    Returns (grad_hidden or None, grad_weight or None); the weight gradient is in the weight
    dtype (accumulated in fp32 when ``weight_grad_fp32``).
    """
    n = hidden.shape[0]
    write_grad = need_hidden_grad or need_weight_grad
    grads = LinearGrads(hidden, weight, need_hidden_grad, need_weight_grad, weight_grad_fp32)
    scratch = torch.empty(n, dtype=torch.float32, device=hidden.device) if loss is None else loss
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for sl in chunks(n, rows):
        logits = hidden[sl] @ weight.t()
        chunk_scale = scale[sl] if scale.dim() else scale
        _launch_ce(logits, targets[sl], scratch[sl], lse[sl], logits if write_grad else None,
                   chunk_scale, ignore_index, label_smoothing, z_loss, softcap)
        grads.add_chunk(sl, logits)
    return grads.result()


_FP32_ADDMM = {"ok": True}


def _fp32_addmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """acc += a @ b for 16-bit a, b straight into the fp32 ``acc`` (cuBLAS ``out_dtype``).

    Saves the (V, d) 16-bit temporary and its extra read/write per chunk.  False where the
    installed torch / device lacks ``addmm(..., out_dtype=)`` (then the caller falls back).
    """
    if not (acc.is_cuda and _FP32_ADDMM["ok"]):
        return False
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        _FP32_ADDMM["ok"] = False
        return False


class LinearGrads:
    """Gradients of ``hidden @ weight.T`` accumulated chunk by chunk from d(logits) chunks."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, need_hidden: bool,
                 need_weight: bool, weight_grad_fp32: bool) -> None:
        self.hidden, self.weight = hidden, weight
        # Row-major whatever hidden's strides, so each chunk's rows are a valid matmul out=.
        self.grad_hidden = (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
                            if need_hidden else None)
        self.grad_weight = None
        if need_weight:
            acc_dtype = torch.float32 if weight_grad_fp32 else weight.dtype
            self.grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)

    def add_chunk(self, sl: slice, dlogits: torch.Tensor) -> None:
        if self.grad_hidden is not None:
            torch.matmul(dlogits, self.weight, out=self.grad_hidden[sl])
        if self.grad_weight is not None:
            gw, h = self.grad_weight, self.hidden[sl]
            if gw.dtype == dlogits.dtype:
                gw.addmm_(dlogits.t(), h)
            elif not _fp32_addmm_into(gw, dlogits.t(), h):
                # One rounded 16-bit GEMM per chunk, summed across chunks in fp32.
                gw += dlogits.t() @ h

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gw = self.grad_weight
        return self.grad_hidden, (gw.to(self.weight.dtype) if gw is not None else None)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, label_smoothing, z_loss,
                softcap, rows, weight_grad_fp32):
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        scale = _grad_scale(targets, ignore_index, reduction)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        pre_scaled = reduction != "none"
        grad_hidden, grad_weight = _linear_ce_pass(
            hidden, weight, targets, scale, ignore_index, label_smoothing, z_loss, softcap, rows,
            need_h and pre_scaled, need_w and pre_scaled, weight_grad_fp32, loss=loss)
        ctx.args = (ignore_index, label_smoothing, z_loss, softcap, rows, weight_grad_fp32)
        ctx.pre_scaled = pre_scaled
        if pre_scaled:
            ctx.save_for_backward(grad_hidden, grad_weight)
        elif need_h or need_w:
            ctx.save_for_backward(hidden, weight, targets)
        return _reduce(loss, scale, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.pre_scaled:
            grad_hidden, grad_weight = ctx.saved_tensors
            # grad_out is 0-d, so the product keeps the gradient dtype (fp32 math inside).
            grad_hidden = grad_hidden * grad_out if need_h else None
            grad_weight = grad_weight * grad_out if need_w else None
        else:
            hidden, weight, targets = ctx.saved_tensors
            ignore_index, label_smoothing, z_loss, softcap, rows, weight_grad_fp32 = ctx.args
            grad_hidden, grad_weight = _linear_ce_pass(
                hidden, weight, targets, grad_out.float(), ignore_index, label_smoothing,
                z_loss, softcap, rows, need_h, need_w, weight_grad_fp32)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                ignore_index: int = -100, reduction: str = "mean",
                                label_smoothing: float = 0.0, z_loss: float = 0.0,
                                softcap: float | None = None, *, weight_grad_fp32: bool = True,
                                chunk_size: int | None = None) -> torch.Tensor:
    """Fused ``cross_entropy(hidden @ weight.T, targets)``; the (N, V) logits never exist in full.

    hidden (..., d), weight (V, d), targets (...). ``weight_grad_fp32`` accumulates the weight
    gradient over chunks in fp32 (no effect for fp32 weights); ``chunk_size`` overrides the
    number of rows per chunk (default: see the module docstring).  With reduction "mean"/"sum"
    the gradients are computed during forward; with "none" they are recomputed in backward.
    """
    h2, t1 = flatten_linear_inputs(hidden, weight, targets)
    check_loss_args(t1, h2.shape[0], reduction, label_smoothing, z_loss, softcap)
    rows = chunk_rows(h2.shape[0], weight.shape[0], hidden.dtype, chunk_size)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        # No-grad fast path: loss only, no gradient buffers, no autograd node.
        loss = torch.empty(h2.shape[0], dtype=torch.float32, device=hidden.device)
        scale = _grad_scale(t1, ignore_index, reduction)
        _linear_ce_pass(h2, weight, t1, scale, ignore_index, label_smoothing, z_loss, softcap,
                        rows, False, False, weight_grad_fp32, loss=loss)
        out = _reduce(loss, scale, reduction)
    else:
        out = _LinearCrossEntropy.apply(h2, weight, t1, ignore_index, reduction, label_smoothing,
                                        z_loss, softcap, rows, weight_grad_fp32)
    return out.view(targets.shape) if reduction == "none" else out
