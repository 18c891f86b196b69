"""Fused attention kernels against the PyTorch reference (the spec).

On CPU the kernels run under the Triton interpreter (set up in conftest.py) with 16-wide tiles,
so the tiny odd shapes used here still span several blocks, ragged tails and the causal
diagonal.  GPU-only cases (bf16, long sequences, head dim 128, compiled with inductor) are
marked ``gpu``.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

import fastgpt.kernels as K
from fastgpt.kernels import attention as attention_api
from fastgpt.kernels import decode_attention as decode_attention_api
from fastgpt.kernels.reference import attention_reference, decode_attention_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

pytestmark = pytest.mark.usefixtures("triton_backend")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ||a - e|| / ||e|| in fp64; NaN anywhere makes it NaN.

    The denominator is floored at an RMS of 1e-3 so exactly-zero references (dq of length-1
    sequences) are compared against rounding noise rather than divided by zero.
    """
    a, e = actual.double(), expected.double()
    floor = 1e-3 * max(1, e.numel()) ** 0.5
    return ((a - e).norm() / e.norm().clamp_min(floor)).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten or overflow)"
    err = rel_err(actual, expected)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:.1g}"


def randn(*shape: int, dtype: torch.dtype, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(grad)


def check_against_reference(q, k, v, causal, cu_seqlens=None, max_seqlen=None, scale=None,
                            tol=None, **options):
    """Forward and all three gradients, with a random (not all-ones) upstream gradient;
    ``options`` (deterministic=False, use_tma=True) go to the Triton kernels directly."""
    tol = tol or TOL[q.dtype]
    dout = torch.randn(q.shape, device=q.device, dtype=q.dtype)
    if options:
        from fastgpt.kernels.triton_attention import attention_triton
        out = attention_triton(q, k, v, causal, scale, cu_seqlens, max_seqlen, **options)
    else:
        out = attention_api(q, k, v, causal, scale, cu_seqlens, max_seqlen)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = attention_reference(q, k, v, causal, scale, cu_seqlens, max_seqlen)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert_close(out, ref, tol, "out")
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, rg, tol, name)


# ------------------------------------------------------------------------------ training
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_batched_matches_reference(dtype, causal):
    torch.manual_seed(1)
    B, T, H, D = 2, 37, 2, 16
    check_against_reference(randn(B, T, H, D, dtype=dtype), randn(B, T, H, D, dtype=dtype),
                            randn(B, T, H, D, dtype=dtype), causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_gqa_with_length_one_sequences(dtype, causal):
    torch.manual_seed(2)
    # Lengths 1, 17, 1, 34, 0, 17: single tokens, ragged tails, an empty sequence, and a
    # sequence spanning three 16-wide blocks.
    cu = torch.tensor([0, 1, 18, 19, 53, 53, 70], device=DEVICE, dtype=torch.int32)
    N, Hq, Hkv, D = 70, 6, 2, 32
    check_against_reference(randn(N, Hq, D, dtype=dtype), randn(N, Hkv, D, dtype=dtype),
                            randn(N, Hkv, D, dtype=dtype), causal, cu, 34)


def test_batched_input_with_cu_seqlens_and_custom_scale():
    torch.manual_seed(3)
    B, T, Hq, Hkv, D = 2, 35, 4, 1, 16  # multi-query attention: one kv head
    cu = torch.tensor([0, 10, 35, 36, 70], device=DEVICE, dtype=torch.int32)  # rows start seqs
    check_against_reference(randn(B, T, Hq, D, dtype=torch.float32),
                            randn(B, T, Hkv, D, dtype=torch.float32),
                            randn(B, T, Hkv, D, dtype=torch.float32), True, cu, None, scale=0.3)


def test_single_token_sequences_only():
    torch.manual_seed(4)
    cu = torch.arange(4, device=DEVICE, dtype=torch.int32)
    q, k, v = (randn(3, 2, 16, dtype=torch.float32) for _ in range(3))
    dout = torch.randn_like(q)
    out = attention_api(q, k, v, True, None, cu, 1)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    # Each token attends only to itself: out = v, dv = dout, dk = 0, and dq is exactly zero in
    # exact arithmetic (rowsum(dO*O) cancels dO.v), so it is checked to rounding level.
    assert_close(out, v.detach(), 1e-6, "out")
    assert_close(dv, dout, 1e-6, "dv")
    assert dq.abs().max() < 1e-5 and dk.abs().max() < 1e-5


def test_non_contiguous_inputs():
    torch.manual_seed(5)
    B, T, H, D = 2, 29, 2, 16
    # q stored head-major and transposed into (B, T, H, D); k, v are slices of a fused qkv.
    q = torch.randn(B, H, T, D, device=DEVICE).transpose(1, 2).requires_grad_()
    kv = torch.randn(B, T, 2, H, D, device=DEVICE)
    k, v = (kv[:, :, i].detach().requires_grad_() for i in range(2))  # strided leaves
    assert not q.is_contiguous() and not k.is_contiguous()
    check_against_reference(q, k, v, True)


@pytest.mark.parametrize("causal", [True, False])
def test_poisoned_buffers_are_fully_written(poison, causal):
    torch.manual_seed(6)
    cu = torch.tensor([0, 1, 20, 45], device=DEVICE, dtype=torch.int32)
    q, k, v = randn(45, 4, 16, dtype=torch.float32), *(randn(45, 2, 16, dtype=torch.float32)
                                                        for _ in range(2))
    check_against_reference(q, k, v, causal, cu, 25)


def test_backward_is_deterministic():
    torch.manual_seed(7)
    cu = torch.tensor([0, 23, 60], device=DEVICE, dtype=torch.int32)
    q, k, v = randn(60, 4, 16, dtype=torch.float16), *(randn(60, 2, 16, dtype=torch.float16)
                                                        for _ in range(2))
    dout = torch.randn_like(q)
    runs = [torch.autograd.grad(attention_api(q, k, v, True, None, cu, 37), (q, k, v), dout)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# Lengths 1, 17, 1, 34, 0, 17 (single tokens, ragged tails, an empty sequence, three blocks).
ODD_CU = [0, 1, 18, 19, 53, 53, 70]


@pytest.mark.parametrize("head_dim,dtype,causal", [(80, torch.float32, True), (96, torch.float16, False),
                                                   (24, torch.float32, True)])
def test_head_dims_below_a_power_of_two(head_dim, dtype, causal):
    """Llama-family head dims (80, 96) and a small odd one run padded inside the kernels."""
    torch.manual_seed(30 + head_dim)
    cu = torch.tensor(ODD_CU, device=DEVICE, dtype=torch.int32)
    check_against_reference(randn(70, 4, head_dim, dtype=dtype), randn(70, 2, head_dim, dtype=dtype),
                            randn(70, 2, head_dim, dtype=dtype), causal, cu, 34)


@pytest.mark.parametrize("dtype,causal,head_dim", [(torch.float32, True, 32), (torch.float16, True, 16),
                                                   (torch.float32, False, 80)])
def test_fused_atomic_backward_matches_reference(poison, dtype, causal, head_dim):
    """deterministic=False: dK/dV and the atomically accumulated dQ in one kernel."""
    torch.manual_seed(40)
    cu = torch.tensor(ODD_CU, device=DEVICE, dtype=torch.int32)
    check_against_reference(randn(70, 6, head_dim, dtype=dtype), randn(70, 2, head_dim, dtype=dtype),
                            randn(70, 2, head_dim, dtype=dtype), causal, cu, 34, deterministic=False)


def test_fused_atomic_backward_batched_mqa():
    torch.manual_seed(41)
    B, T, Hq, Hkv, D = 2, 37, 3, 1, 16
    check_against_reference(randn(B, T, Hq, D, dtype=torch.float32), randn(B, T, Hkv, D, dtype=torch.float32),
                            randn(B, T, Hkv, D, dtype=torch.float32), True, deterministic=False)


@pytest.mark.parametrize("dtype,causal", [(torch.float32, True), (torch.float16, False)])
def test_tma_forward_matches_reference(dtype, causal):
    """use_tma=True: tiles through tensor descriptors (emulated by the interpreter on CPU);
    a tile overhanging the sequence reads the next one, which the masks must neutralise."""
    torch.manual_seed(42)
    cu = torch.tensor(ODD_CU, device=DEVICE, dtype=torch.int32)
    check_against_reference(randn(70, 4, 32, dtype=dtype), randn(70, 2, 32, dtype=dtype),
                            randn(70, 2, 32, dtype=dtype), causal, cu, 34, use_tma=True)


def test_tma_forward_falls_back_for_padded_head_dims():
    torch.manual_seed(43)
    B, T, H, D = 1, 21, 2, 80  # 80 is not a power of two: the pointer forward runs
    check_against_reference(randn(B, T, H, D, dtype=torch.float32), randn(B, T, H, D, dtype=torch.float32),
                            randn(B, T, H, D, dtype=torch.float32), True, use_tma=True)


def test_launch_description_names_every_kernel():
    from fastgpt.kernels.triton_attention import describe_launch

    text = describe_launch(64, torch.float16, torch.device(DEVICE), 4096, group=4)
    assert "attn_fwd" in text and "attn_bwd_dkdv" in text and "attn_bwd_dq" in text
    fused = describe_launch(80, torch.float16, torch.device(DEVICE), 100, deterministic=False)
    assert "attn_bwd_fused" in fused and "attn_bwd_dq" not in fused


def test_table_lookup_uses_mha_entries_at_group_one_only(monkeypatch):
    """A GQA-sensitive backward kernel takes its MHA-only entry without GQA and the entry that
    holds at any group with it; other kernels have no MHA-only entries."""
    launch = importlib.import_module("fastgpt.kernels.launch")
    table = importlib.import_module("fastgpt.kernels.launch_table").TABLE
    monkeypatch.setattr(launch, "INTERPRET", False)
    monkeypatch.setattr(launch, "gpu_arch", lambda index=0: "sm90")
    cuda = torch.device("cuda", 0)  # a device object only: nothing runs
    mha = {k: v for k, v in table.items() if "/mha" in k}
    assert mha and all(k.split("/")[0] in launch.GQA_SENSITIVE for k in mha)
    key = next(k for k in mha if k.endswith("/mha/short"))
    kernel, d_class = key.split("/")[:2]
    block_d = 64 if d_class == "d64" else 128
    cfg, source = launch.lookup(kernel, block_d, torch.bfloat16, cuda, 1024, group=1)
    assert f"table {key} " in source and cfg.block_n == table[key]["block_n"]
    _, source = launch.lookup(kernel, block_d, torch.bfloat16, cuda, 1024, group=4)
    assert "/mha" not in source and "table " in source
    _, source = launch.lookup("attn_fwd", 64, torch.bfloat16, cuda, 1024, group=1)
    assert "/mha" not in source


def test_input_validation():
    q = torch.randn(8, 2, 16, device=DEVICE)
    with pytest.raises(TypeError, match="int32"):
        attention_api(q, q, q, True, None, torch.tensor([0, 8], device=DEVICE), 8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        attention_api(q, q, q)
    bad = torch.randn(8, 2, 160, device=DEVICE)
    with pytest.raises(ValueError, match="head dim must be in"):
        attention_api(bad, bad, bad, True, None, torch.tensor([0, 8], device=DEVICE,
                                                            dtype=torch.int32), 8)


# ------------------------------------------------------------------ custom op / compile
def test_custom_ops_pass_opcheck():
    attn = importlib.import_module("fastgpt.kernels.triton_attention")

    torch.manual_seed(8)
    cu = torch.tensor([0, 5, 21], device=DEVICE, dtype=torch.int32)
    q = randn(21, 2, 16, dtype=torch.float32)
    k, v = randn(21, 1, 16, dtype=torch.float32), randn(21, 1, 16, dtype=torch.float32)
    args = (q, k, v, cu, 16, True, 0.25)
    torch.library.opcheck(torch.ops.fastgpt.flash_attn_fwd.default, args)
    out, lse = attn.flash_attn_fwd(*args)
    dout = torch.randn_like(out)
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, cu, 16, True, 0.25)
    torch.library.opcheck(torch.ops.fastgpt.flash_attn_bwd.default, bwd_args)


def test_torch_compile_fullgraph():
    torch.manual_seed(9)
    B, T, H, D = 1, 20, 2, 16

    def block(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        q, k, v = (x @ w).view(B, T, 3, H, D).unbind(2)
        return attention_api(q, k, v, causal=True).sum(dim=(2, 3))

    # aot_eager runs the whole AOTAutograd pipeline (fake tensors, the custom ops' fake and
    # autograd registrations) without a C++ toolchain; inductor is exercised on GPU below.
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    x = randn(B, T, 3 * H * D, dtype=torch.float32)
    w = (torch.randn(3 * H * D, 3 * H * D, device=DEVICE) / (3 * H * D) ** 0.5).requires_grad_()
    dy = torch.randn(B, T, device=DEVICE)
    out = compiled(x, w)
    grads = torch.autograd.grad(out, (x, w), dy)
    with K.backend("reference"):
        ref = block(x, w)
    ref_grads = torch.autograd.grad(ref, (x, w), dy)
    assert_close(out, ref, 1e-5, "compiled out")
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, 1e-5, "compiled grad")


@pytest.mark.slow
def test_torch_compile_inductor_cpu():
    """Inductor (C++ on CPU, ~40 s) around the opaque custom ops, forward and backward."""
    torch.manual_seed(13)
    B, T, H, D = 1, 20, 2, 16

    def block(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        q, k, v = (x @ w).view(B, T, 3, H, D).unbind(2)
        return attention_api(q, k, v, causal=True).sum(dim=(2, 3))

    compiled = torch.compile(block, fullgraph=True)
    x = randn(B, T, 3 * H * D, dtype=torch.float32)
    w = (torch.randn(3 * H * D, 3 * H * D, device=DEVICE) / (3 * H * D) ** 0.5).requires_grad_()
    dy = torch.randn(B, T, device=DEVICE)
    out = compiled(x, w)
    grads = torch.autograd.grad(out, (x, w), dy)
    with K.backend("reference"):
        ref = block(x, w)
    ref_grads = torch.autograd.grad(ref, (x, w), dy)
    assert_close(out, ref, 1e-5, "compiled out")
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, 1e-5, "compiled grad")


# -------------------------------------------------------------------------------- decode
def _decode_case(B, Tq, Hq, Hkv, D, Bc, Tmax, lengths, dtype, batch_idx=None):
    q = torch.randn(B, Tq, Hq, D, device=DEVICE, dtype=dtype)
    kc = torch.randn(Bc, Tmax, Hkv, D, device=DEVICE, dtype=dtype)
    vc = torch.randn(Bc, Tmax, Hkv, D, device=DEVICE, dtype=dtype)
    seqlens = torch.tensor(lengths, device=DEVICE, dtype=torch.int32)
    idx = None if batch_idx is None else torch.tensor(batch_idx, device=DEVICE, dtype=torch.int32)
    return q, kc, vc, seqlens, idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tq", [1, 3])
def test_decode_matches_reference_with_splits(poison, monkeypatch, dtype, tq):
    dec = importlib.import_module("fastgpt.kernels.triton_decode")

    # Split even this short cache (on GPU the default minimum chunk would give one split).
    monkeypatch.setattr(dec, "_MIN_SPLIT_KEYS", 16)
    torch.manual_seed(10)
    Tmax = 70
    assert dec.decode_num_splits(Tmax, 4, 2) > 1  # several splits, some empty for short rows
    # Row lengths: only the new tokens, ragged, a full cache; rows read permuted cache rows.
    q, kc, vc, seqlens, idx = _decode_case(4, tq, 4, 2, 16, 5, Tmax, [tq, 17, 70, 40], dtype,
                                           batch_idx=[4, 0, 2, 1])
    out = decode_attention_api(q, kc, vc, seqlens, None, idx)
    ref = decode_attention_reference(q, kc, vc, seqlens, None, idx)
    assert_close(out, ref, TOL[dtype], "decode out")


def test_decode_custom_op_opcheck_and_compiled_fullgraph():
    """Under torch.compile the decode launcher is one opaque custom op: its fake shape holds,
    and a traced decode (dynamic shapes, as the engine's compile_decode uses) equals the
    reference.  (On the H200 Inductor failed re-compiling the kernels traced without it.)"""
    dec = importlib.import_module("fastgpt.kernels.triton_decode")
    torch.manual_seed(14)
    q, kc, vc, seqlens, idx = _decode_case(3, 1, 4, 2, 16, 4, 40, [40, 7, 22], torch.float32,
                                           batch_idx=[3, 0, 1])
    torch.library.opcheck(torch.ops.fastgpt.decode_attention.default, (q, kc, vc, seqlens, 0.25, idx))
    assert_close(dec.decode_attention_op(q, kc, vc, seqlens, 0.25, idx),
                 decode_attention_reference(q, kc, vc, seqlens, 0.25, idx), 1e-5, "op out")

    def step(q, kc, vc, seqlens, idx):
        return decode_attention_api(q * 1.0, kc, vc, seqlens, None, idx) + 1.0

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    for rows in (3, 2):  # a shrinking batch: one graph, dynamic batch size
        out = compiled(q[:rows], kc, vc, seqlens[:rows], idx[:rows])
        ref = decode_attention_reference(q[:rows], kc, vc, seqlens[:rows], None, idx[:rows]) + 1.0
        assert_close(out, ref, 1e-5, "compiled decode out")


def test_decode_without_batch_idx_strided_cache_and_scale():
    torch.manual_seed(11)
    B, Tq, Hq, Hkv, D, Tmax = 2, 2, 2, 2, 32, 45
    # Cache stored (B, Hkv, Tmax, D) and viewed as (B, Tmax, Hkv, D): strided, not copied.
    kc = torch.randn(B, Hkv, Tmax, D, device=DEVICE).transpose(1, 2)
    vc = torch.randn(B, Hkv, Tmax, D, device=DEVICE).transpose(1, 2)
    q = torch.randn(B, Tq, Hq, D, device=DEVICE)
    seqlens = torch.tensor([45, 9], device=DEVICE, dtype=torch.int32)
    out = decode_attention_api(q, kc, vc, seqlens, 0.2)
    assert_close(out, decode_attention_reference(q, kc, vc, seqlens, 0.2), 1e-5, "decode out")


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_gqa_rows_padded_head_dim_and_forced_splits(poison, splits):
    """9 real rows per tile (Tq 3 x group 3) in a 16-row tile, head dim 80 padded to 128; one
    split writes the output directly, three go through unpadded partials and the combine."""
    from fastgpt.kernels.triton_decode import decode_attention_triton

    torch.manual_seed(14)
    q, kc, vc, seqlens, idx = _decode_case(3, 3, 6, 2, 80, 4, 50, [50, 3, 29], torch.float32,
                                           batch_idx=[2, 0, 3])
    out = decode_attention_triton(q, kc, vc, seqlens, None, idx, num_splits=splits)
    ref = decode_attention_reference(q, kc, vc, seqlens, None, idx)
    assert_close(out, ref, 1e-5, "decode out")


def test_decode_single_split_for_short_cache():
    from fastgpt.kernels.triton_decode import decode_num_splits

    assert decode_num_splits(8, 1, 1) == 1
    torch.manual_seed(12)
    q, kc, vc, seqlens, _ = _decode_case(2, 1, 4, 1, 16, 2, 8, [8, 3], torch.float32)
    out = decode_attention_api(q, kc, vc, seqlens)
    assert_close(out, decode_attention_reference(q, kc, vc, seqlens), 1e-5, "decode out")


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_bf16_varlen_gqa(causal, head_dim):
    torch.manual_seed(20)
    cu = torch.tensor([0, 1, 300, 301, 1100, 2048], device=DEVICE, dtype=torch.int32)
    q = randn(2048, 8, head_dim, dtype=torch.bfloat16)
    k, v = randn(2048, 2, head_dim, dtype=torch.bfloat16), randn(2048, 2, head_dim,
                                                                 dtype=torch.bfloat16)
    check_against_reference(q, k, v, causal, cu, 947)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_hd128_batched(dtype):
    torch.manual_seed(21)
    B, T, H, D = 2, 1000, 4, 128
    check_against_reference(randn(B, T, H, D, dtype=dtype), randn(B, T, H, D, dtype=dtype),
                            randn(B, T, H, D, dtype=dtype), True)


@pytest.mark.gpu
@gpu
def test_gpu_long_sequence_8k():
    torch.manual_seed(22)
    B, T, H, D = 1, 8192, 2, 64
    q, k, v = (randn(B, T, H, D, dtype=torch.bfloat16) for _ in range(3))
    dout = torch.randn_like(q)
    out = attention_api(q, k, v, True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    # The reference's T x T fp32 scores (8k^2 x 2 heads = 512 MiB) still fit comfortably.
    ref = attention_reference(q, k, v, True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert_close(out, ref, TOL[torch.bfloat16], "out")
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, rg, TOL[torch.bfloat16], name)


@pytest.mark.gpu
@gpu
def test_gpu_decode_bf16_long_cache():
    torch.manual_seed(23)
    q, kc, vc, seqlens, idx = _decode_case(3, 4, 16, 4, 128, 4, 8192, [8192, 100, 5000],
                                           torch.bfloat16, batch_idx=[3, 1, 0])
    out = decode_attention_api(q, kc, vc, seqlens, None, idx)
    ref = decode_attention_reference(q, kc, vc, seqlens, None, idx)
    assert_close(out, ref, TOL[torch.bfloat16], "decode out")


@pytest.mark.gpu
@gpu
def test_gpu_torch_compile_inductor():
    torch.manual_seed(24)
    B, T, H, D = 2, 300, 4, 64

    def block(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        q, k, v = (x @ w).view(B, T, 3, H, D).unbind(2)
        return attention_api(q, k, v, causal=True).flatten(2)

    compiled = torch.compile(block, fullgraph=True)
    x = randn(B, T, H * D, dtype=torch.bfloat16)
    w = randn(H * D, 3 * H * D, dtype=torch.bfloat16)
    with torch.no_grad():
        w.mul_(1 / math.sqrt(H * D))
    dy = torch.randn(B, T, H * D, device=DEVICE, dtype=torch.bfloat16)
    out = compiled(x, w)
    grads = torch.autograd.grad(out, (x, w), dy)
    with K.backend("reference"):
        ref = block(x, w)
    ref_grads = torch.autograd.grad(ref, (x, w), dy)
    assert_close(out, ref, TOL[torch.bfloat16], "compiled out")
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, TOL[torch.bfloat16], "compiled grad")
