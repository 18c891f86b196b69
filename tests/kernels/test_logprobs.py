"""Triton fused linear log-probs / entropy against the PyTorch reference (forward and both
backward paths), under the Triton interpreter on CPU."""
from __future__ import annotations

import pytest
import torch

import fastgpt.kernels as K
from fastgpt.kernels.triton_logprobs import linear_logprobs_triton
from fastgpt.kernels.reference import linear_logprobs_reference

IGNORE = -100
N, V, D = 31, 173, 36
CHUNK = 8  # 31 rows -> 3 full chunks and a partial one


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton needs CUDA tensors on a GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Max error within ``rel`` of the expected tensor's magnitude; NaN/inf never pass."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values in result"
    a, e = actual.double(), expected.double()
    err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = max(e.abs().max().item() if e.numel() else 0.0, 1e-6)
    assert err <= rel * scale, f"max error {err:.3e} > {rel:.0e} * {scale:.3e}"


def make_targets(n: int, v: int, gen: torch.Generator, ignored: int) -> torch.Tensor:
    t = torch.randint(0, v, (n,), generator=gen)
    t[torch.randperm(n, generator=gen)[:ignored]] = IGNORE
    return t.to(DEVICE)


def _inputs(gen, dtype=torch.float32, n=N, ignored=5):
    hidden = torch.randn(n, D, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(V, D, generator=gen) * D**-0.5 * 2).to(DEVICE, dtype)
    return hidden, weight, make_targets(n, V, gen, ignored)


def _check(hidden, weight, targets, temperature, rel, gen, use=("lp", "ent"), chunk_size=CHUNK,
           need=(True, True)):
    """Compare outputs and the gradients of sum(g_lp * lp) + sum(g_ent * ent) (random g)."""
    h = hidden.detach().clone().requires_grad_(need[0])
    w = weight.detach().clone().requires_grad_(need[1])
    lp, ent = linear_logprobs_triton(h, w, targets, temperature, IGNORE, chunk_size=chunk_size)
    hr = hidden.detach().clone().requires_grad_(need[0])
    wr = weight.detach().clone().requires_grad_(need[1])
    lp_ref, ent_ref = linear_logprobs_reference(hr, wr, targets, temperature, IGNORE)
    assert lp.dtype == ent.dtype == torch.float32
    assert_close(lp, lp_ref, rel)
    assert_close(ent, ent_ref, rel)
    g_lp = torch.randn(lp.shape, generator=gen).to(DEVICE)
    g_ent = torch.randn(lp.shape, generator=gen).to(DEVICE)
    obj = sum(((lp * g_lp).sum() if "lp" in use else 0.0,
               (ent * g_ent).sum() if "ent" in use else 0.0))
    obj_ref = sum(((lp_ref * g_lp).sum() if "lp" in use else 0.0,
                   (ent_ref * g_ent).sum() if "ent" in use else 0.0))
    inputs = [t for t, n in zip((h, w), need) if n]
    ref_inputs = [t for t, n in zip((hr, wr), need) if n]
    for a, e, x in zip(torch.autograd.grad(obj, inputs), torch.autograd.grad(obj_ref, ref_inputs),
                       inputs):
        assert a.dtype == x.dtype and a.shape == x.shape
        assert_close(a, e, rel)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.9])
def test_logprobs_fp32_both_outputs(poison, temperature):
    gen = torch.Generator().manual_seed(int(temperature * 10))
    _check(*_inputs(gen), temperature, 1e-5, gen)


@pytest.mark.parametrize("use", [("lp",), ("ent",)])
def test_logprobs_single_output_grad(use):
    # The unused output's upstream gradient arrives as zeros (or None): both must work.
    gen = torch.Generator().manual_seed(20)
    _check(*_inputs(gen), 0.8, 1e-5, gen, use=use)


@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_logprobs_partial_grads(need):
    gen = torch.Generator().manual_seed(21)
    _check(*_inputs(gen), 1.0, 1e-5, gen, need=need)


def test_logprobs_fp16():
    gen = torch.Generator().manual_seed(22)
    _check(*_inputs(gen, torch.float16), 0.9, 1e-2, gen)


def test_logprobs_transposed_views():
    gen = torch.Generator().manual_seed(28)
    hidden = torch.randn(D, N, generator=gen).to(DEVICE).t()
    weight = (torch.randn(D, V, generator=gen) * 0.3).to(DEVICE).t()
    _check(hidden, weight, make_targets(N, V, gen, 4), 1.2, 1e-5, gen)


def test_logprobs_chunk_one_and_whole():
    gen = torch.Generator().manual_seed(23)
    hidden, weight, targets = _inputs(gen, n=9, ignored=2)
    for chunk in (1, 64):
        _check(hidden, weight, targets, 1.0, 1e-5, gen, chunk_size=chunk)


def test_logprobs_public_api_3d_noncontiguous(triton_backend):
    gen = torch.Generator().manual_seed(24)
    B, T = 4, 5
    hidden = torch.randn(D, B, T, generator=gen).to(DEVICE).permute(1, 2, 0).requires_grad_()
    weight = (torch.randn(D, V, generator=gen) * 0.3).to(DEVICE).t().requires_grad_()
    targets = make_targets(B * T, V, gen, 3).view(B, T)
    lp, ent = K.linear_logprobs(hidden, weight, targets, 1.3, IGNORE)
    assert lp.shape == ent.shape == (B, T)
    lp_ref, ent_ref = linear_logprobs_reference(hidden.reshape(-1, D), weight,
                                                targets.reshape(-1), 1.3, IGNORE)
    assert_close(lp, lp_ref.view(B, T), 1e-5)
    assert_close(ent, ent_ref.view(B, T), 1e-5)
    g = torch.randn(2, B, T, generator=gen).to(DEVICE)
    obj = (lp * g[0]).sum() + (ent * g[1]).sum()
    obj_ref = (lp_ref.view(B, T) * g[0]).sum() + (ent_ref.view(B, T) * g[1]).sum()
    for a, e in zip(torch.autograd.grad(obj, (hidden, weight)),
                    torch.autograd.grad(obj_ref, (hidden, weight))):
        assert_close(a, e, 1e-5)


def test_logprobs_all_ignored(poison):
    gen = torch.Generator().manual_seed(25)
    hidden, weight, _ = _inputs(gen, n=6)
    hidden.requires_grad_()
    weight.requires_grad_()
    lp, ent = linear_logprobs_triton(hidden, weight, torch.full((6,), IGNORE, device=DEVICE), chunk_size=4)
    assert not lp.any() and not ent.any()
    gh, gw = torch.autograd.grad(lp.sum() + 2 * ent.sum(), (hidden, weight))
    assert not gh.any() and not gw.any()
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()


def test_logprobs_no_grad_path():
    gen = torch.Generator().manual_seed(26)
    hidden, weight, targets = _inputs(gen)
    lp_ref, ent_ref = linear_logprobs_reference(hidden, weight, targets)
    lp, ent = linear_logprobs_triton(hidden, weight, targets, chunk_size=CHUNK)
    assert lp.grad_fn is None and ent.grad_fn is None
    assert_close(lp, lp_ref, 1e-5)
    with torch.no_grad():
        lp, ent = linear_logprobs_triton(hidden.requires_grad_(), weight, targets,
                                         chunk_size=CHUNK)
    assert lp.grad_fn is None
    assert_close(ent, ent_ref, 1e-5)


def test_logprobs_bad_inputs():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs_triton(h, w, t, temperature=0.0)
    with pytest.raises(TypeError, match="integer"):
        linear_logprobs_triton(h, w, t.float())
    with pytest.raises(ValueError, match="weight must be"):
        linear_logprobs_triton(h, w[None], t)


@pytest.mark.gpu
@needs_cuda
def test_logprobs_bf16_gpu_large_vocab():
    n, d, v = 1000, 256, 128_256
    gen = torch.Generator(device="cuda").manual_seed(27)
    hidden = torch.randn(n, d, device="cuda", generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(v, d, device="cuda", generator=gen) * d**-0.5).bfloat16()
    weight.requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    targets[::5] = IGNORE
    g = torch.randn(2, n, device="cuda", generator=gen)
    lp, ent = linear_logprobs_triton(hidden, weight, targets, 0.9, chunk_size=384)
    ((lp * g[0]).sum() + (ent * g[1]).sum()).backward()
    hr, wr = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    lp_ref, ent_ref = linear_logprobs_reference(hr, wr, targets, 0.9)
    ((lp_ref * g[0]).sum() + (ent_ref * g[1]).sum()).backward()
    assert_close(lp, lp_ref, 1e-2)
    assert_close(ent, ent_ref, 1e-2)
    assert_close(hidden.grad.float(), hr.grad, 3e-2)
    assert_close(weight.grad.float(), wr.grad, 3e-2)
