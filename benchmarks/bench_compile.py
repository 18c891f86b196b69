"""gpu_check section "compile": what a cold start costs -- each fastgpt Triton kernel's first call
(JIT compile for sm_90 + module load + one run) at the benchmarks' head dims and dtype, timed in
a process with an empty Triton cache (gpu_check gives this section a TRITON_CACHE_DIR of its
own), next to the same call once compiled.  Also the launch configuration each one used.

The benchmark sections report their own first-call seconds (``first_call_s``, and
``compile_s`` for torch.compile); this section isolates the Triton compile cost so the time
budget of a GPU run can be planned.  In the rehearsal the same calls run in the interpreter.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Iterator

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from measure import Plan, error_text, sync  # noqa: E402


def _attention_calls(head_dim: int, dtype: torch.dtype, device: str, tokens: int
                     ) -> list[tuple[str, Callable[[], object], Callable[[], str]]]:
    from fastgpt.kernels.triton_attention import attention_triton, describe_launch
    heads = 2048 // head_dim if device == "cuda" else 2  # the benchmarks' strides
    q, k, v = (torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    dev = torch.device(device)

    def describe(**kw):
        return lambda: describe_launch(head_dim, dtype, dev, tokens, **kw)

    return [
        ("attn_fwd", lambda: attention_triton(q.detach(), k.detach(), v.detach()),
         describe(backward=False)),
        ("attn_fwd+bwd", lambda: torch.autograd.grad(attention_triton(q, k, v), (q, k, v), dout),
         describe()),
        ("attn_fwd+bwd_atomic", lambda: torch.autograd.grad(
            attention_triton(q, k, v, deterministic=False), (q, k, v), dout), describe(deterministic=False)),
        ("attn_fwd_tma", lambda: attention_triton(q.detach(), k.detach(), v.detach(), use_tma=True),
         describe(backward=False, use_tma=True)),
    ]


def _decode_call(head_dim: int, dtype: torch.dtype, device: str, t_max: int):
    from fastgpt.kernels.triton_decode import decode_attention_triton, decode_launch
    heads = 2048 // head_dim if device == "cuda" else 2
    q = torch.randn(4, 1, heads, head_dim, device=device, dtype=dtype)
    kc, vc = (torch.randn(4, t_max, heads, head_dim, device=device, dtype=dtype) for _ in range(2))
    lengths = torch.full((4,), t_max, device=device, dtype=torch.int32)
    cfg, source = decode_launch(head_dim, dtype, torch.device(device), t_max)
    return ("attn_decode", lambda: decode_attention_triton(q, kc, vc, lengths),
            lambda: f"attn_decode {cfg} [{source}]")


def _loss_calls(dtype: torch.dtype, device: str, n: int, d: int, v: int):
    from fastgpt.kernels.triton_cross_entropy import _block_v, _num_warps, linear_cross_entropy_triton
    from fastgpt.kernels.triton_logprobs import linear_logprobs_triton
    h = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, d, device=device) * d**-0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), device=device)
    block = _block_v(v)
    cfg = lambda: f"BLOCK_V {block} w{_num_warps(block)}"  # noqa: E731
    return [
        ("linear_ce fwd+bwd", lambda: torch.autograd.grad(linear_cross_entropy_triton(h, w, t), (h, w)), cfg),
        ("linear_logprobs fwd+bwd", lambda: torch.autograd.grad(
            sum(x.sum() for x in linear_logprobs_triton(h, w, t)), (h, w)), cfg),
    ]


def gpu_check_rows(plan: Plan) -> Iterator[dict]:
    device = plan.device.type
    if plan.rehearse:
        dtype, head_dims, tokens, t_max, (n, d, v) = torch.float32, (16,), 40, 40, (24, 32, 100)
        note = "rehearsal: interpreter, fp32, tiny shapes (no compilation happens)"
    else:
        dtype, head_dims, tokens, t_max, (n, d, v) = torch.bfloat16, (64, 128), 1024, 1024, (1024, 2048, 128256)
        note = "cold Triton cache; first call = compile + load + one run"
    calls = []
    for hd in head_dims:
        calls += [(hd, *c) for c in _attention_calls(hd, dtype, device, tokens)]
        calls.append((hd, *_decode_call(hd, dtype, device, t_max)))
    calls += [(None, *c) for c in _loss_calls(dtype, device, n, d, v)]
    for head_dim, name, fn, config in calls:
        row = {"kernel": name, "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."), "note": note}
        try:
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            row["first_call_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            fn()
            sync(device)
            row["second_call_s"] = time.perf_counter() - t0
            row["config"] = config()
        except Exception as exc:
            row["error"] = error_text(exc)
        yield row
