"""The whole model on the Triton kernels (interpreter on CPU) matches the model on references."""
import torch

import fastgpt.kernels as K
from fastgpt.config import ModelConfig
from fastgpt.engine import SamplingParams, generate
from fastgpt.model import GPT, cu_seqlens_from_lengths

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton needs CUDA tensors on a GPU


def _model(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=67, block_size=48, n_layer=2, n_head=4, n_embd=64, **kw)
    return GPT(cfg).to(DEVICE)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def test_packed_training_step_matches_reference():
    for variant in ({}, dict(norm="rmsnorm", mlp="swiglu", position="rope", n_kv_head=2, bias=False)):
        model = _model(**variant)
        idx = torch.randint(0, 67, (2, 23), device=DEVICE)
        targets = torch.randint(0, 67, (2, 23), device=DEVICE)
        targets[0, :5] = -100
        cu = cu_seqlens_from_lengths([9, 1, 13, 23], DEVICE)
        results = []
        for name in ("reference", "triton"):
            model.zero_grad()
            with K.backend(name):
                _, loss = model(idx, targets, cu_seqlens=cu, max_seqlen=23)
                loss.backward()
                lp, ent = model.token_logprobs(idx, targets.clamp(min=0), cu_seqlens=cu, temperature=0.7)
            grads = [p.grad.clone() for p in model.parameters()]
            results.append((loss.detach(), grads, lp.detach(), ent.detach()))
        (l0, g0, lp0, e0), (l1, g1, lp1, e1) = results
        assert _rel(l1, l0) < 1e-5
        assert max(_rel(a, b) for a, b in zip(g1, g0)) < 1e-4
        assert _rel(lp1, lp0) < 1e-5 and _rel(e1, e0) < 1e-5


def test_generation_on_triton_decode_matches_reference():
    model = _model().eval()
    prompts = [[1, 2, 3, 4, 5], [7], [9, 8, 7]]
    params = SamplingParams(max_new_tokens=6, temperature=0)
    with K.backend("reference"):
        ref = generate(model, prompts, params)
    with K.backend("triton"):
        out = generate(model, prompts, params)
    assert [g.tokens for g in out] == [g.tokens for g in ref]
