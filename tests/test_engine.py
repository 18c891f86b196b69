"""Generation engine: KV cache equals recomputation, sampling semantics, stops, limits, errors."""
from __future__ import annotations

import math

import pytest
import torch

from fastgpt.config import ModelConfig
from fastgpt.engine import GenerationError, SamplingParams, generate, process_logits, sample_next
from fastgpt.model import GPT

TINY = dict(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=32)
CONFIGS = {
    "gpt2": ModelConfig(**TINY),
    "modern": ModelConfig(**{**TINY, "n_head": 4, "n_kv_head": 2}, norm="rmsnorm", mlp="swiglu",
                          position="rope", bias=False, tie_embeddings=False),
}
PROMPTS = [[5, 9, 14], [200, 3, 7, 7, 1, 90, 42, 11, 6], [77], [1, 2, 3, 4, 5, 6]]


def _model(name: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(CONFIGS[name]).eval()
    with torch.no_grad():  # larger weights than the init: peaked, tie-free greedy choices
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model


@torch.no_grad()
def greedy_no_cache(model: GPT, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_matches_recomputation(name):
    model = _model(name)
    outs = generate(model, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0))
    for prompt, out in zip(PROMPTS, outs):
        assert out.tokens == greedy_no_cache(model, prompt, 12)
        assert not out.finished and out.finish_reason == "length"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logprobs_match_recomputed_logprobs(name):
    model = _model(name)
    params = SamplingParams(max_new_tokens=8, temperature=0.7, seed=3)
    outs = generate(model, PROMPTS, params, logprobs=True)
    for prompt, out in zip(PROMPTS, outs):
        seq = torch.tensor([prompt + out.tokens])
        targets = torch.tensor([[-100] * (len(prompt) - 1) + out.tokens + [-100]])
        lp, _ = model.token_logprobs(seq, targets, temperature=0.7)
        expect = lp[0, len(prompt) - 1:len(prompt) - 1 + len(out.tokens)]
        torch.testing.assert_close(torch.tensor(out.logprobs), expect, atol=1e-4, rtol=1e-4)


def test_seeded_sampling_is_reproducible():
    model = _model("gpt2")
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a = [g.tokens for g in generate(model, PROMPTS, params)]
    b = [g.tokens for g in generate(model, PROMPTS, params)]
    c = [g.tokens for g in generate(model, PROMPTS, SamplingParams(max_new_tokens=10, seed=8))]
    assert a == b and a != c
    # batching does not change a row's samples only through its seed: split batches are reproducible too
    assert [g.tokens for g in generate(model, PROMPTS, params, batch_size=2)] == \
           [g.tokens for g in generate(model, PROMPTS, params, batch_size=2)]


def test_stop_per_row_and_streaming():
    model = _model("gpt2")
    free = generate(model, PROMPTS, SamplingParams(max_new_tokens=10, temperature=0))
    stop = free[1].tokens[3]
    streamed: dict[int, list[int]] = {}
    outs = generate(model, PROMPTS, SamplingParams(max_new_tokens=10, temperature=0, stop_ids=(stop,)),
                    on_token=lambda row, tok: streamed.setdefault(row, []).append(tok))
    for row, (f, o) in enumerate(zip(free, outs)):
        if stop in f.tokens:
            cut = f.tokens.index(stop) + 1
            assert o.tokens == f.tokens[:cut] and o.finished and o.finish_reason == "stop"
        else:
            assert o.tokens == f.tokens and not o.finished
        assert streamed[row] == o.tokens
    assert outs[1].finished and len(outs[1].tokens) <= 4


def test_max_new_tokens_and_context_limit():
    model = _model("modern")
    outs = generate(model, PROMPTS, SamplingParams(max_new_tokens=5, temperature=1.0, seed=0))
    assert all(len(o.tokens) == 5 for o in outs)
    near_full = [[3] * 60]
    out = generate(model, near_full, SamplingParams(max_new_tokens=50, temperature=0))[0]
    assert len(out.tokens) == 4  # the context (64) runs out first
    with pytest.raises(ValueError):
        SamplingParams(max_new_tokens=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prompt_longer_than_context_is_a_clear_error(name):
    model = _model(name)
    with pytest.raises(GenerationError, match="prompt 1 has 64 tokens; the model's context is 64"):
        generate(model, [[1, 2], [7] * 64], SamplingParams(max_new_tokens=4))
    with pytest.raises(GenerationError, match="empty"):
        generate(model, [[]], SamplingParams())


def test_compile_flag_is_ignored_on_cpu():
    model = _model("gpt2")
    params = SamplingParams(max_new_tokens=6, temperature=0)
    assert [g.tokens for g in generate(model, PROMPTS, params, compile_decode=True)] == \
           [g.tokens for g in generate(model, PROMPTS, params)]


# ------------------------------------------------------------ sampling semantics, hand-made logits
LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0]])


def test_temperature():
    out = process_logits(LOGITS.clone(), SamplingParams(temperature=2.0), None)
    torch.testing.assert_close(out, LOGITS / 2)
    greedy, _ = sample_next(LOGITS.clone(), SamplingParams(temperature=0), None)
    assert greedy.tolist() == [0]


def test_top_k():
    out = process_logits(LOGITS.clone(), SamplingParams(top_k=2), None)
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(LOGITS.clone(), SamplingParams(top_k=2), g)[0]) for _ in range(200)}
    assert draws == {0, 1}


def test_top_p():
    p = torch.softmax(LOGITS, -1)[0]  # ~[0.644, 0.237, 0.087, 0.032]
    keep = lambda top_p: torch.isfinite(process_logits(LOGITS.clone(), SamplingParams(top_p=top_p), None))[0].tolist()  # noqa: E731
    assert keep(0.5) == [True, False, False, False]
    assert keep(float(p[0]) + 0.01) == [True, True, False, False]  # smallest set holding >= top_p
    assert keep(0.95) == [True, True, True, False]


def test_repetition_penalty():
    seen = torch.tensor([[True, False, False, True]])
    out = process_logits(LOGITS.clone(), SamplingParams(repetition_penalty=2.0, temperature=1.0), seen)
    # positive seen logits are divided, negative ones multiplied: both become less likely
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0, 0.0, -2.0]]))
    assert math.isclose(float(out[0, 1]), 1.0)
