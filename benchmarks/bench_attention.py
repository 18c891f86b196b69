"""Benchmarks: fused attention forward and forward+backward, fastgpt against its peers.

Cases (GPU: bf16, causal):
    square      H*D = 2048 (hd 64 x 32 heads, hd 128 x 16 heads), 1k..16k tokens per sequence,
                B = 16384 // S, so every case holds 16k tokens (the FlashAttention papers' setup)
    gpt2-small  12 heads x hd 64, B 16 x 1024 tokens: what pre-training gpt2-small runs
    varlen-gqa  16k tokens packed from sequences of 37..2048 tokens (seeded), GQA 32/8 heads at
                hd 64 and 16/4 at hd 128: what SFT / reward / PPO batches run
Implementations (each skipped, with the reason, where unavailable):
    fastgpt         fastgpt's Triton kernels (deterministic two-kernel backward)
    fastgpt_atomic  the fused backward with atomic dQ (``deterministic=False``; 5 GEMMs, not 7)
    fastgpt_tma     the forward through TMA tensor descriptors
    sdpa_flash / sdpa_cudnn   torch SDPA restricted to the FlashAttention-2 / cuDNN backend
    torch_varlen    torch.nn.attention.varlen.varlen_attn (FlashAttention-2 varlen), varlen only
    sdpa_padded     varlen cases the plain-PyTorch way: pad every sequence to the longest, SDPA flash
    flash_attn      flash_attn's functions, if that package is importable
    eager           the PyTorch reference (fp32 S x S scores), only where those fit (S <= 2048)

Per row: median ms over >= 20 CUDA-event-timed runs after warm-up, TFLOP/s with the formula in
the row (FlashAttention convention: causal fwd = 2 * sum(L^2) * H * D, fwd+bwd = 3.5 x fwd),
peak MB above the inputs (CUDA allocator), the first call's seconds (compile / autotune) and, for
fastgpt, the launch configuration used.  The rehearsal runs one tiny fp32 case per group on the
CPU (fastgpt through the Triton interpreter).

    python benchmarks/gpu_check.py --only attention
    python -m pytest benchmarks/bench_attention.py --benchmark-only
"""
from __future__ import annotations

import os
import random
from typing import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Must precede the first triton import (see tests/kernels/conftest.py).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastgpt.kernels.reference import attention_reference  # noqa: E402
from measure import Plan, error_text, first_call_s, free_memory, peak_mb, time_ms  # noqa: E402

CUDA = torch.cuda.is_available()
TOKENS = 16384
MODEL_DIM = 2048  # H * D
MODES = ("fwd", "fwd_bwd")
FLOP_FORMULA = {"fwd": "2*sum(L^2)*H*D", "fwd_bwd": "7*sum(L^2)*H*D"}
PEERS = ("sdpa_flash", "sdpa_cudnn", "flash_attn", "eager")
VARLEN_PEERS = ("torch_varlen", "sdpa_padded", "eager")
FASTGPT_IMPLS = ("fastgpt", "fastgpt_atomic", "fastgpt_tma")


def _packed_lengths(total: int, lo: int, hi: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(lo, hi), total - sum(lengths)))
    return lengths


def case(name: str, lengths: list[int], heads: int, kv_heads: int, head_dim: int,
         dtype: torch.dtype = torch.bfloat16, device: str = "cuda", note: str = "") -> dict:
    return dict(name=name, lengths=lengths, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                dtype=dtype, device=device, causal=True, note=note)


def gpu_cases() -> list[dict]:
    square = [case(f"S{s}-hd{d}", [s] * (TOKENS // s), MODEL_DIM // d, MODEL_DIM // d, d)
              for d in (64, 128) for s in (1024, 2048, 4096, 8192, 16384)]
    gpt2 = [case("gpt2-small-S1024", [1024] * 16, 12, 12, 64)]
    lengths = _packed_lengths(TOKENS, 37, 2048, seed=0)
    varlen = [case("varlen-gqa-hd64", lengths, 32, 8, 64), case("varlen-gqa-hd128", lengths, 16, 4, 128)]
    return square + gpt2 + varlen


def rehearsal_cases() -> list[dict]:
    note = "rehearsal: CPU fp32 (bf16 on the GPU), interpreter"
    kw = dict(dtype=torch.float32, device="cpu", note=note)
    return [case("S24-hd16", [24] * 2, 2, 2, 16, **kw), case("gpt2-small-tiny", [17] * 2, 3, 3, 16, **kw),
            case("varlen-gqa-tiny", [1, 9, 20], 4, 2, 16, **kw)]


def is_varlen(c: dict) -> bool:
    return len(set(c["lengths"])) > 1 or c["heads"] != c["kv_heads"]


def attention_flops(c: dict, mode: str) -> float:
    """FlashAttention convention: fwd 4*L^2*H*D per sequence, halved when causal; bwd 2.5x fwd."""
    fwd = sum(4.0 * n * n for n in c["lengths"]) * c["heads"] * c["head_dim"] / (2 if c["causal"] else 1)
    return fwd if mode == "fwd" else 3.5 * fwd


# ------------------------------------------------------------------------ implementations
# Each takes (q, k, v, cu_seqlens, case) with packed (N, H, D) tensors and returns (N, Hq, D).
def _batched(x: torch.Tensor, c: dict) -> torch.Tensor:
    return x.view(len(c["lengths"]), c["lengths"][0], *x.shape[1:])


def _fastgpt(**options) -> Callable:
    def run(q, k, v, cu, c):
        from fastgpt.kernels.triton_attention import attention_triton
        if not is_varlen(c):  # the plain (B, T, H, D) path pre-training takes
            return attention_triton(_batched(q, c), _batched(k, c), _batched(v, c), c["causal"],
                                    **options).flatten(0, 1)
        return attention_triton(q, k, v, c["causal"], None, cu, max(c["lengths"]), **options)
    return run


def _expand_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    return k.repeat_interleave(heads // k.shape[-2], dim=-2) if k.shape[-2] != heads else k


def _sdpa(backend_name: str) -> Callable:
    def run(q, k, v, cu, c):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        qb, kb, vb = (_batched(x, c).transpose(1, 2) for x in (q, _expand_kv(k, c["heads"]),
                                                               _expand_kv(v, c["heads"])))
        if q.device.type == "cpu":  # rehearsal: SDPA's own CPU backend
            out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=c["causal"])
        else:
            with sdpa_kernel(getattr(SDPBackend, backend_name)):
                out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=c["causal"])
        return out.transpose(1, 2).flatten(0, 1)
    return run


def _sdpa_padded(q, k, v, cu, c):
    """Pad every sequence to the longest and run SDPA flash: what a plain trainer does."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    lengths, longest = c["lengths"], max(c["lengths"])
    pos = torch.cat([torch.arange(n, device=q.device) for n in lengths])
    row = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                  torch.tensor(lengths, device=q.device))

    def pad(x):
        out = x.new_zeros(len(lengths), longest, *x.shape[1:])
        out[row, pos] = x
        return out.transpose(1, 2)

    qp, kp, vp = pad(q), pad(_expand_kv(k, c["heads"])), pad(_expand_kv(v, c["heads"]))
    if q.device.type == "cpu":
        out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=c["causal"])
    else:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=c["causal"])
    return out.transpose(1, 2)[row, pos]


def _torch_varlen(q, k, v, cu, c):
    from torch.nn.attention.varlen import varlen_attn
    longest = max(c["lengths"])
    k, v = _expand_kv(k, c["heads"]), _expand_kv(v, c["heads"])
    if q.device.type == "cpu":
        # No CPU kernel: check the call on meta tensors, time the reference in its place.
        meta = [x.detach().to("meta") for x in (q, k, v)]
        varlen_attn(*meta, cu.to("meta"), cu.to("meta"), longest, longest, window_size=(-1, 0))
        return attention_reference(q, k, v, c["causal"], None, cu, longest)
    try:
        return varlen_attn(q, k, v, cu, cu, longest, longest, window_size=(-1, 0))
    except TypeError:  # older torch: is_causal instead of window_size
        return varlen_attn(q, k, v, cu, cu, longest, longest, is_causal=True)


def _flash_attn(q, k, v, cu, c):
    from flash_attn import flash_attn_varlen_func
    longest = max(c["lengths"])
    return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=c["causal"])


def _eager(q, k, v, cu, c):
    return attention_reference(q, k, v, c["causal"], None, cu, max(c["lengths"]))


IMPLS: dict[str, Callable] = {
    "fastgpt": _fastgpt(), "fastgpt_atomic": _fastgpt(deterministic=False),
    "fastgpt_tma": _fastgpt(use_tma=True), "sdpa_flash": _sdpa("FLASH_ATTENTION"),
    "sdpa_cudnn": _sdpa("CUDNN_ATTENTION"), "torch_varlen": _torch_varlen,
    "sdpa_padded": _sdpa_padded, "flash_attn": _flash_attn, "eager": _eager,
}
# Which modes each implementation is measured in (the A/B variants only change one pass).
IMPL_MODES = {"fastgpt_atomic": ("fwd_bwd",), "fastgpt_tma": ("fwd",)}


def impls_for(c: dict) -> tuple[str, ...]:
    return FASTGPT_IMPLS + (VARLEN_PEERS if is_varlen(c) else PEERS)


def unavailable(impl: str, c: dict) -> str | None:
    """Why ``impl`` cannot run ``c`` here, or None."""
    cpu = c["device"] == "cpu"
    if impl == "flash_attn":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "skipped: flash_attn is not installed"
    if impl == "torch_varlen":
        try:
            # `import torch.nn.attention.varlen` here would make `torch` a local of this function
            from torch.nn.attention import varlen  # noqa: F401
        except ImportError:
            return "skipped: this torch has no torch.nn.attention.varlen"
    if impl == "sdpa_cudnn" and not cpu:
        from torch.nn.attention import SDPBackend
        if not hasattr(SDPBackend, "CUDNN_ATTENTION"):
            return "skipped: this torch has no cuDNN SDPA backend"
    if impl == "eager" and not cpu:
        # ~4 fp32 copies of the scores: per sequence for a plain batch, all tokens x all tokens
        # (masked) for a packed one
        squares = sum(c["lengths"]) ** 2 if is_varlen(c) else sum(n * n for n in c["lengths"])
        if max(c["lengths"]) > 2048 or 16 * c["heads"] * squares > 0.5 * torch.cuda.mem_get_info()[0]:
            return "skipped: the reference's fp32 scores would not fit (or S > 2048)"
    if impl == "flash_attn" and cpu:
        return "skipped: flash_attn needs CUDA"
    return None


def cpu_note(impl: str) -> str:
    return {"sdpa_flash": "; SDPA's CPU backend in place of FLASH",
            "sdpa_cudnn": "; SDPA's CPU backend in place of cuDNN",
            "sdpa_padded": "; SDPA's CPU backend in place of FLASH",
            "torch_varlen": "; call checked on meta tensors, reference timed"}.get(impl, "")


# ---------------------------------------------------------------------------- measuring
def inputs(c: dict, seed: int = 0):
    gen = torch.Generator(device=c["device"]).manual_seed(seed)
    n = sum(c["lengths"])

    def rand(h):
        return torch.randn(n, h, c["head_dim"], device=c["device"], generator=gen).to(c["dtype"])

    cu = torch.tensor([0] + c["lengths"], device=c["device"]).cumsum(0).to(torch.int32)
    return rand(c["heads"]), rand(c["kv_heads"]), rand(c["kv_heads"]), rand(c["heads"]), cu


def step(impl: str, c: dict, mode: str) -> Callable[[], None]:
    fn = IMPLS[impl]
    q, k, v, dout, cu = inputs(c)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(q, k, v, cu, c)
        return run
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def run():  # autograd.grad: no gradient outlives the call (clean peak-memory baseline)
        torch.autograd.grad(fn(q, k, v, cu, c), (q, k, v), dout)
    return run


def launch_config(c: dict, impl: str, mode: str) -> str | None:
    """The launch configuration fastgpt's kernels chose for this case (after the call)."""
    if not impl.startswith("fastgpt"):
        return None
    from fastgpt.kernels.triton_attention import describe_launch
    return describe_launch(c["head_dim"], c["dtype"], torch.device(c["device"]), max(c["lengths"]),
                           c["heads"] // c["kv_heads"], backward=mode == "fwd_bwd",
                           deterministic=impl != "fastgpt_atomic", use_tma=impl == "fastgpt_tma")


def measure(impl: str, c: dict, mode: str, timing: dict) -> dict:
    """One implementation x case x mode: ms, TFLOP/s, peak MB, first-call seconds; ``timing``
    are :func:`measure.time_ms`'s run counts (``Plan.timing()``)."""
    run = step(impl, c, mode)
    first = first_call_s(run, c["device"])  # compilation / autotuning / allocator
    peak = peak_mb(run, c["device"])
    t = time_ms(run, c["device"], **timing, flush_l2=True)
    return {"ms": t["ms"], "tflops": attention_flops(c, mode) / (t["ms"] * 1e-3) / 1e12,
            "peak_mb": peak, "runs": t["runs"], "first_call_s": first}


def rows_for(c: dict, impl: str, timing: dict) -> Iterator[dict]:
    for mode in IMPL_MODES.get(impl, MODES):
        row = {"case": c["name"], "impl": impl, "mode": mode, "tokens": sum(c["lengths"]),
               "heads": f"{c['heads']}/{c['kv_heads']}", "head_dim": c["head_dim"],
               "dtype": str(c["dtype"]).removeprefix("torch."), "flop_formula": FLOP_FORMULA[mode]}
        reason = unavailable(impl, c)
        if reason:
            yield {**row, "status": reason}
            continue
        try:
            row.update(measure(impl, c, mode, timing))
            row["config"] = launch_config(c, impl, mode)
        except Exception as exc:  # one failing implementation (OOM, unsupported) must not stop the rest
            row["error"] = error_text(exc)
        if c["device"] == "cpu":
            row["note"] = c["note"] + cpu_note(impl)
        free_memory(c["device"])
        yield row


def ceiling_rows(plan: Plan) -> Iterator[dict]:
    """The two ceilings of this GPU, measured in the same run: a large bf16 matmul (the attention
    targets are stated as a share of it) and a device-to-device copy (bytes read + written)."""
    n, dtype = (64, torch.float32) if plan.rehearse else (8192, torch.bfloat16)
    a, b = (torch.randn(n, n, device=plan.device).to(dtype) for _ in range(2))
    t = time_ms(lambda: a @ b, plan.device, **plan.timing())
    yield {"case": "ceiling", "impl": f"torch.matmul {n}^3", "dtype": str(dtype).removeprefix("torch."),
           "ms": t["ms"], "runs": t["runs"], "tflops": 2 * n**3 / (t["ms"] * 1e-3) / 1e12,
           "flop_formula": "2*n^3"}
    nbytes = 2**20 if plan.rehearse else 2**31
    src = torch.randn(nbytes // 4, device=plan.device)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), plan.device, **plan.timing())
    yield {"case": "ceiling", "impl": f"device copy {nbytes // 2**20} MiB", "ms": t["ms"], "runs": t["runs"],
           "gbs": 2 * nbytes / (t["ms"] * 1e-3) / 1e9, "flop_formula": "GB/s = (read + written) / time"}


def gpu_check_rows(plan: Plan) -> Iterator[dict]:
    yield from ceiling_rows(plan)
    for c in rehearsal_cases() if plan.rehearse else gpu_cases():
        for impl in impls_for(c):
            yield from rows_for(c, impl, plan.timing())


# ------------------------------------------------------------------------ pytest-benchmark
def _bench(benchmark, impl: str, c: dict, mode: str) -> None:
    reason = unavailable(impl, c)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"attention {mode} {c['name']}"
    stats = measure(impl, c, mode, Plan(rehearse=c["device"] == "cpu", deadline=0).timing())
    run = step(impl, c, mode)

    def timed():
        run()
        if c["device"] == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=2 if c["device"] == "cpu" else 20, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(stats)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ("fastgpt", "sdpa_flash", "sdpa_cudnn"))
@pytest.mark.parametrize("c", gpu_cases(), ids=lambda c: c["name"])
def test_bench_attention_gpu(benchmark, c, impl, mode):
    if is_varlen(c) and impl.startswith("sdpa"):
        impl = "torch_varlen"
    _bench(benchmark, impl, c, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ("fastgpt", "eager"))
def test_bench_attention_cpu_tiny(benchmark, impl, mode):
    _bench(benchmark, impl, rehearsal_cases()[0], mode)


if __name__ == "__main__":
    import time
    for r in gpu_check_rows(Plan(rehearse=not CUDA, deadline=time.time() + 600)):
        print(r)
