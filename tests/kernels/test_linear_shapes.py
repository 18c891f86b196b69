"""The fused lm-head functions accept (..., d) hidden states with (...) targets on *both*
backends, with the same semantics: leading dimensions are flattened into tokens.

The expected values come from plain torch on flattened logits (F.cross_entropy / log_softmax),
not from the reference, because the reference is one of the two things under test here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastgpt.kernels as K

IGNORE = -100
D, V = 8, 11
SHAPES = [(5,), (2, 3), (3, 1, 4), ()]  # leading shapes; () is a single token
BACKENDS = ["reference", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton needs CUDA tensors on a GPU


def _inputs(lead: tuple[int, ...], seed: int):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, D, generator=gen)
    weight = torch.randn(V, D, generator=gen)
    targets = torch.randint(0, V, lead, generator=gen)
    if targets.numel() > 2:
        targets.view(-1)[1] = IGNORE
    return hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE)


def _flat_logits(hidden, weight):
    return (hidden.reshape(-1, D) @ weight.t()).float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_any_leading_shape(backend, lead, reduction):
    hidden, weight, targets = _inputs(lead, seed=len(lead))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with K.backend(backend):
        out = K.linear_cross_entropy(h, w, targets, IGNORE, reduction)
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = F.cross_entropy(_flat_logits(hr, wr), targets.reshape(-1), ignore_index=IGNORE,
                               reduction=reduction)
    if reduction == "none":
        expected = expected.view(lead)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    g = torch.randn(out.shape, device=DEVICE)
    for a, e in zip(torch.autograd.grad(out, (h, w), g), torch.autograd.grad(expected, (hr, wr), g)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", SHAPES)
def test_linear_logprobs_any_leading_shape(backend, lead):
    hidden, weight, targets = _inputs(lead, seed=10 + len(lead))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with K.backend(backend):
        lp, ent = K.linear_logprobs(h, w, targets, 1.5, IGNORE)
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = torch.log_softmax(_flat_logits(hr, wr) / 1.5, dim=-1)
    flat_t = targets.reshape(-1)
    valid = flat_t != IGNORE
    lp_e = torch.where(valid, logp.gather(1, flat_t.clamp(min=0)[:, None]).squeeze(1), 0.0)
    ent_e = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
    lp_e, ent_e = lp_e.view(lead), ent_e.view(lead)
    assert lp.shape == ent.shape == tuple(lead)
    torch.testing.assert_close(lp, lp_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_e, rtol=1e-5, atol=1e-5)
    g1, g2 = torch.randn(lead, device=DEVICE), torch.randn(lead, device=DEVICE)
    obj, obj_e = (lp * g1).sum() + (ent * g2).sum(), (lp_e * g1).sum() + (ent_e * g2).sum()
    for a, e in zip(torch.autograd.grad(obj, (h, w)), torch.autograd.grad(obj_e, (hr, wr))):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_backends_reject_the_same_shapes(backend):
    hidden, weight, targets = _inputs((2, 3), seed=0)
    with K.backend(backend):
        with pytest.raises(ValueError, match="leading shape"):
            K.linear_cross_entropy(hidden, weight, targets.reshape(-1))
        with pytest.raises(ValueError, match="leading shape"):
            K.linear_logprobs(hidden, weight, targets.t())
        with pytest.raises(ValueError, match="disagree on d"):
            K.linear_cross_entropy(hidden, weight[:, :-1], targets)
        with pytest.raises(ValueError, match="logits must be"):
            K.cross_entropy(hidden @ weight.t(), targets)
