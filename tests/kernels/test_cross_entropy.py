"""Triton cross-entropy and fused linear cross-entropy against the PyTorch reference.

On CPU these run under the Triton interpreter (see conftest.py), so shapes are tiny and odd
(not multiples of the 64-wide interpreter block or of the chunk size).
"""
from __future__ import annotations

import zlib

import pytest
import torch

import fastgpt.kernels as K
from fastgpt.kernels.triton_cross_entropy import cross_entropy_triton, linear_cross_entropy_triton
from fastgpt.kernels.reference import cross_entropy_reference, linear_cross_entropy_reference

IGNORE = -100
N, V, D = 29, 197, 40
CHUNK = 8  # 29 rows -> 3 full chunks and a partial one

OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 4.0},
    "all": {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 3.0},
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton needs CUDA tensors on a GPU
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def seed_of(*parts: str) -> int:
    """A seed per parameter set that, unlike hash(), is the same in every process."""
    return zlib.crc32("/".join(parts).encode())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Max error within ``rel`` of the expected tensor's magnitude; NaN/inf never pass."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values in result"
    a, e = actual.double(), expected.double()
    err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = max(e.abs().max().item() if e.numel() else 0.0, 1e-6)
    assert err <= rel * scale, f"max error {err:.3e} > {rel:.0e} * {scale:.3e}"


def make_targets(n: int, v: int, gen: torch.Generator, ignored: int = 5) -> torch.Tensor:
    t = torch.randint(0, v, (n,), generator=gen)
    t[torch.randperm(n, generator=gen)[:ignored]] = IGNORE
    return t.to(DEVICE)


def upstream(out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A gradient that is not ones: random per row, or a scaled scalar."""
    if out.dim():
        return torch.randn(out.shape, generator=gen).to(out.device)
    return torch.tensor(1.7, device=out.device)


# ------------------------------------------------------------------ cross-entropy on logits
def _check_ce(logits, targets, reduction, rel, gen, **kw):
    x = logits.detach().clone().requires_grad_()
    out = cross_entropy_triton(x, targets, IGNORE, reduction, **kw)
    g = upstream(out, gen)
    (grad,) = torch.autograd.grad(out, x, g)
    xr = logits.detach().clone().requires_grad_()
    ref = cross_entropy_reference(xr, targets, IGNORE, reduction, **kw)
    (grad_ref,) = torch.autograd.grad(ref, xr, g)
    assert out.dtype == torch.float32
    assert_close(out, ref, rel)
    assert grad.dtype == logits.dtype
    assert_close(grad, grad_ref, rel)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_cross_entropy_fp32(triton_backend, poison, reduction, option):
    gen = torch.Generator().manual_seed(seed_of(reduction, option))
    logits = (torch.randn(N, V, generator=gen) * 3).to(DEVICE)
    _check_ce(logits, make_targets(N, V, gen), reduction, 1e-5, gen, **OPTIONS[option])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_fp16(triton_backend, reduction):
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(N, V, generator=gen) * 3).half().to(DEVICE)
    _check_ce(logits, make_targets(N, V, gen), reduction, 1e-2, gen, **OPTIONS["all"])


def test_cross_entropy_noncontiguous_and_large_logits(triton_backend):
    gen = torch.Generator().manual_seed(2)
    # Transposed view: column stride N, row stride 1; large magnitudes test the online max.
    logits = (torch.randn(V, N, generator=gen) * 40).to(DEVICE).t()
    assert not logits.is_contiguous()
    _check_ce(logits, make_targets(N, V, gen), "none", 1e-5, gen, label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_all_ignored(triton_backend, poison, reduction):
    x = torch.randn(7, V, device=DEVICE, requires_grad=True)
    t = torch.full((7,), IGNORE, device=DEVICE)
    out = cross_entropy_triton(x, t, IGNORE, reduction, z_loss=1e-3)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_cross_entropy_no_grad_and_double_backward_guard(triton_backend):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, V, generator=gen).to(DEVICE).requires_grad_()
    t = make_targets(N, V, gen)
    with torch.no_grad():
        out = cross_entropy_triton(x, t)
    assert out.grad_fn is None
    assert_close(out, cross_entropy_reference(x.detach(), t), 1e-5)
    loss = cross_entropy_triton(x, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_public_cross_entropy_dispatches_to_triton(triton_backend):
    import fastgpt.kernels.triton_cross_entropy  # noqa: F401  (what the first Triton call does)

    assert callable(K.cross_entropy), "fastgpt.kernels.cross_entropy must stay the public function"
    gen = torch.Generator().manual_seed(14)
    x, t = torch.randn(5, 70, generator=gen).to(DEVICE), make_targets(5, 70, gen, ignored=1)
    assert_close(K.cross_entropy(x, t), cross_entropy_reference(x, t), 1e-5)


def test_cross_entropy_bad_inputs(triton_backend):
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="shape"):
        cross_entropy_triton(x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy_triton(x, torch.zeros(4, dtype=torch.long), reduction="avg")
    with pytest.raises(TypeError, match="integer"):
        cross_entropy_triton(x, torch.zeros(4))
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        cross_entropy_triton(x[None], torch.zeros(4, dtype=torch.long))


# ------------------------------------------------------------------- fused linear CE
def _linear_inputs(gen, dtype=torch.float32, n=N):
    hidden = torch.randn(n, D, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(V, D, generator=gen) * D**-0.5 * 2).to(DEVICE, dtype)
    return hidden, weight, make_targets(n, V, gen)


def _check_linear(hidden, weight, targets, reduction, rel, gen, chunk_size=CHUNK,
                  need=(True, True), **kw):
    h = hidden.detach().clone().requires_grad_(need[0])
    w = weight.detach().clone().requires_grad_(need[1])
    out = linear_cross_entropy_triton(h, w, targets, IGNORE, reduction, chunk_size=chunk_size,
                                      **kw)
    hr = hidden.detach().clone().requires_grad_(need[0])
    wr = weight.detach().clone().requires_grad_(need[1])
    ref = linear_cross_entropy_reference(hr, wr, targets, IGNORE, reduction, **kw)
    assert_close(out, ref, rel)
    g = upstream(out, gen)
    inputs = [t for t, n in zip((h, w), need) if n]
    ref_inputs = [t for t, n in zip((hr, wr), need) if n]
    for a, e, x in zip(torch.autograd.grad(out, inputs, g),
                       torch.autograd.grad(ref, ref_inputs, g), inputs):
        assert a.dtype == x.dtype and a.shape == x.shape
        assert_close(a, e, rel)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", ["plain", "all"])
def test_linear_ce_fp32(poison, reduction, option):
    gen = torch.Generator().manual_seed(seed_of(reduction, option, "lin"))
    _check_linear(*_linear_inputs(gen), reduction, 1e-5, gen, **OPTIONS[option])


@pytest.mark.parametrize("option", ["smoothing", "z_loss", "softcap"])
def test_linear_ce_options(option):
    gen = torch.Generator().manual_seed(4)
    _check_linear(*_linear_inputs(gen), "mean", 1e-5, gen, **OPTIONS[option])


def test_linear_ce_transposed_views():
    gen = torch.Generator().manual_seed(15)
    hidden = torch.randn(D, N, generator=gen).to(DEVICE).t()
    weight = (torch.randn(D, V, generator=gen) * 0.3).to(DEVICE).t()
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    _check_linear(hidden, weight, make_targets(N, V, gen), "mean", 1e-5, gen)


@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_linear_ce_partial_grads(need):
    gen = torch.Generator().manual_seed(5)
    _check_linear(*_linear_inputs(gen), "sum", 1e-5, gen, need=need)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_ce_fp16(reduction):
    gen = torch.Generator().manual_seed(6)
    _check_linear(*_linear_inputs(gen, torch.float16), reduction, 1e-2, gen, **OPTIONS["all"])


def test_linear_ce_public_api_3d_noncontiguous(triton_backend):
    gen = torch.Generator().manual_seed(7)
    B, T = 3, 7
    # (B, T, d) hidden that is a permuted view, (B, T) targets, default chunking.
    hidden = torch.randn(D, T, B, generator=gen).to(DEVICE).permute(2, 1, 0).requires_grad_()
    weight = (torch.randn(D, V, generator=gen) * 0.3).to(DEVICE).t().requires_grad_()
    targets = make_targets(B * T, V, gen).view(B, T)
    out = K.linear_cross_entropy(hidden, weight, targets, IGNORE, "none", label_smoothing=0.1)
    assert out.shape == (B, T)
    ref = linear_cross_entropy_reference(hidden.reshape(-1, D), weight, targets.reshape(-1),
                                         IGNORE, "none", label_smoothing=0.1).view(B, T)
    assert_close(out, ref, 1e-5)
    g = torch.randn(B, T, generator=gen).to(DEVICE)
    for a, e in zip(torch.autograd.grad(out, (hidden, weight), g),
                    torch.autograd.grad(ref, (hidden, weight), g)):
        assert_close(a, e, 1e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_ce_all_ignored(poison, reduction):
    gen = torch.Generator().manual_seed(8)
    hidden, weight, _ = _linear_inputs(gen, n=11)
    hidden.requires_grad_()
    weight.requires_grad_()
    out = linear_cross_entropy_triton(hidden, weight, torch.full((11,), IGNORE, device=DEVICE), IGNORE,
                                      reduction, chunk_size=4)
    gh, gw = torch.autograd.grad(out.sum(), (hidden, weight))
    assert torch.equal(out, torch.zeros_like(out))
    assert not gh.any() and not gw.any()


def test_linear_ce_no_grad_path():
    gen = torch.Generator().manual_seed(9)
    hidden, weight, targets = _linear_inputs(gen)
    ref = linear_cross_entropy_reference(hidden, weight, targets, IGNORE)
    out = linear_cross_entropy_triton(hidden, weight, targets, chunk_size=CHUNK)
    assert out.grad_fn is None
    assert_close(out, ref, 1e-5)
    with torch.no_grad():
        out = linear_cross_entropy_triton(hidden.requires_grad_(), weight, targets,
                                          chunk_size=CHUNK)
    assert out.grad_fn is None
    assert_close(out, ref, 1e-5)


def test_linear_ce_weight_grad_accumulation_dtype():
    gen = torch.Generator().manual_seed(10)
    hidden, weight, targets = _linear_inputs(gen, torch.float16)
    grads = []
    for fp32 in (True, False):
        w = weight.clone().requires_grad_()
        out = linear_cross_entropy_triton(hidden, w, targets, chunk_size=CHUNK,
                                          weight_grad_fp32=fp32)
        (gw,) = torch.autograd.grad(out, w)
        assert gw.dtype == torch.float16
        grads.append(gw)
    assert_close(grads[1], grads[0], 1e-2)


def test_linear_ce_bad_inputs():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="disagree on d"):
        linear_cross_entropy_triton(h, torch.randn(10, 9), t)
    with pytest.raises(TypeError, match="dtypes differ"):
        linear_cross_entropy_triton(h, w.double(), t)
    with pytest.raises(ValueError, match="leading shape"):
        linear_cross_entropy_triton(h, w, t[:3])
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy_triton(h, w, t, chunk_size=0)


# --------------------------------------------------------------------------- GPU only
def _chunked_reference_ce(logits, targets, reduction, rows=2048, **kw):
    """fp32 reference loss and d(sum of per-row loss)/d logits, a chunk at a time on the GPU."""
    losses, grads = [], []
    for s in range(0, logits.shape[0], rows):
        x = logits[s:s + rows].float().requires_grad_()
        loss = cross_entropy_reference(x, targets[s:s + rows], IGNORE, "none", **kw)
        (g,) = torch.autograd.grad(loss.sum(), x)
        losses.append(loss.detach())
        grads.append(g.to(logits.dtype))
    return torch.cat(losses), torch.cat(grads)


@gpu
@needs_cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_bf16_gpu(reduction):
    gen = torch.Generator(device="cuda").manual_seed(11)
    logits = (torch.randn(300, 50_000, device="cuda", generator=gen) * 3).bfloat16()
    targets = torch.randint(0, 50_000, (300,), device="cuda", generator=gen)
    targets[::7] = IGNORE
    x = logits.clone().requires_grad_()
    out = cross_entropy_triton(x, targets, IGNORE, "none", **OPTIONS["all"])
    out.sum().backward()
    ref, ref_grad = _chunked_reference_ce(logits, targets, "none", **OPTIONS["all"])
    assert_close(out, ref, 1e-3)
    assert_close(x.grad.float(), ref_grad.float(), 2e-2)


@gpu
@needs_cuda
@pytest.mark.slow
def test_cross_entropy_int64_offsets_gpu():
    # N * V > 2**31: row offsets overflow int32.
    n, v = 16_400, 131_072
    gen = torch.Generator(device="cuda").manual_seed(12)
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, generator=gen)
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    x = logits.requires_grad_()
    out = cross_entropy_triton(x, targets, IGNORE, "sum")
    out.backward()
    ref, ref_grad = _chunked_reference_ce(logits.detach(), targets, "none")
    assert_close(out, ref.sum(), 1e-4)
    tail = slice(n - 64, n)  # the rows past 2**31 elements
    assert_close(x.grad[tail].float(), ref_grad[tail].float(), 2e-2)
    del x, logits


@gpu
@needs_cuda
def test_linear_ce_bf16_gpu_large_vocab():
    n, d, v = 1000, 256, 128_256
    gen = torch.Generator(device="cuda").manual_seed(13)
    hidden = torch.randn(n, d, device="cuda", generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(v, d, device="cuda", generator=gen) * d**-0.5).bfloat16()
    weight.requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    targets[::5] = IGNORE
    out = linear_cross_entropy_triton(hidden, weight, targets, chunk_size=384, z_loss=1e-4)
    out.backward()
    hr, wr = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = linear_cross_entropy_reference(hr, wr, targets, z_loss=1e-4)
    ref.backward()
    assert_close(out, ref, 1e-2)
    assert_close(hidden.grad.float(), hr.grad, 3e-2)
    assert_close(weight.grad.float(), wr.grad, 3e-2)
