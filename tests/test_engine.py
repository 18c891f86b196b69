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


LOOPS = ["shrinking", "static"]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_matches_recomputation(name, loop):
    model = _model(name)
    outs = generate(model, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0), decode_loop=loop)
    for prompt, out in zip(PROMPTS, outs):
        assert out.tokens == greedy_no_cache(model, prompt, 12)
        assert not out.finished and out.finish_reason == "length"


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logprobs_match_recomputed_logprobs(name, loop):
    model = _model(name)
    params = SamplingParams(max_new_tokens=8, temperature=0.7, seed=3, stop_ids=(17,))
    outs = generate(model, PROMPTS, params, logprobs=True, decode_loop=loop)
    for prompt, out in zip(PROMPTS, outs):
        seq = torch.tensor([prompt + out.tokens])
        targets = torch.tensor([[-100] * (len(prompt) - 1) + out.tokens + [-100]])
        lp, _ = model.token_logprobs(seq, targets, temperature=0.7)
        expect = lp[0, len(prompt) - 1:len(prompt) - 1 + len(out.tokens)]
        torch.testing.assert_close(torch.tensor(out.logprobs), expect, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("loop", LOOPS)
def test_seeded_sampling_is_reproducible(loop):
    model = _model("gpt2")
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a = [g.tokens for g in generate(model, PROMPTS, params, decode_loop=loop)]
    b = [g.tokens for g in generate(model, PROMPTS, params, decode_loop=loop)]
    c = [g.tokens for g in generate(model, PROMPTS, SamplingParams(max_new_tokens=10, seed=8), decode_loop=loop)]
    assert a == b and a != c
    # batching does not change a row's samples only through its seed: split batches are reproducible too
    assert [g.tokens for g in generate(model, PROMPTS, params, batch_size=2)] == \
           [g.tokens for g in generate(model, PROMPTS, params, batch_size=2)]


@pytest.mark.parametrize("loop", LOOPS)
def test_stop_per_row_and_streaming(loop):
    model = _model("gpt2")
    free = generate(model, PROMPTS, SamplingParams(max_new_tokens=10, temperature=0), decode_loop=loop)
    stop = free[1].tokens[3]
    streamed: dict[int, list[int]] = {}
    outs = generate(model, PROMPTS, SamplingParams(max_new_tokens=10, temperature=0, stop_ids=(stop,)),
                    on_token=lambda row, tok: streamed.setdefault(row, []).append(tok), decode_loop=loop)
    for row, (f, o) in enumerate(zip(free, outs)):
        if stop in f.tokens:
            cut = f.tokens.index(stop) + 1
            assert o.tokens == f.tokens[:cut] and o.finished and o.finish_reason == "stop"
        else:
            assert o.tokens == f.tokens and not o.finished
        assert streamed[row] == o.tokens
    assert outs[1].finished and len(outs[1].tokens) <= 4


@pytest.mark.parametrize("loop", LOOPS)
def test_max_new_tokens_and_context_limit(loop):
    model = _model("modern")
    outs = generate(model, PROMPTS, SamplingParams(max_new_tokens=5, temperature=1.0, seed=0), decode_loop=loop)
    assert all(len(o.tokens) == 5 for o in outs)
    near_full = [[3] * 60]
    out = generate(model, near_full, SamplingParams(max_new_tokens=50, temperature=0), decode_loop=loop)[0]
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


@pytest.mark.parametrize("name", list(CONFIGS))
def test_static_loop_equals_shrinking_loop(name):
    """Greedy, with stop tokens that end rows at different steps, the repetition penalty and a
    vocabulary limit: the loop that keeps finished rows gives every row the same tokens,
    finish reasons and log-probs as the one that drops them."""
    model = _model(name)
    free = generate(model, PROMPTS, SamplingParams(max_new_tokens=14, temperature=0))
    stops = (free[0].tokens[2], free[3].tokens[6])
    params = SamplingParams(max_new_tokens=14, temperature=0, stop_ids=stops, repetition_penalty=1.3)
    a = generate(model, PROMPTS, params, logprobs=True, vocab_limit=300, decode_loop="shrinking")
    b = generate(model, PROMPTS, params, logprobs=True, vocab_limit=300, decode_loop="static")
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.finished for g in a] == [g.finished for g in b] and any(g.finished for g in a)
    assert len({len(g.tokens) for g in a}) > 1  # rows really ended at different steps
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(y.logprobs), torch.tensor(x.logprobs), atol=1e-5, rtol=1e-5)
    with pytest.raises(GenerationError, match="decode_loop='fast'"):
        generate(model, PROMPTS, params, decode_loop="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_uncaptured_step():
    """On CUDA the static loop replays a captured graph: same tokens as the shrinking loop
    when no row stops early (equal shapes, so bitwise-equal bf16 arithmetic), and a captured run
    with stops agrees with its own uncaptured prefix."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50304, block_size=128, n_layer=2, n_head=12, n_embd=768)
    model = GPT(cfg).cuda().eval()
    prompts = torch.randint(0, 50000, (5, 17)).tolist() + [[7] * 3]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    static = generate(model, prompts, params, decode_loop="static")
    shrinking = generate(model, prompts, params, decode_loop="shrinking")
    assert [g.tokens for g in static] == [g.tokens for g in shrinking]
    stop = static[0].tokens[5]
    stopped = generate(model, prompts, SamplingParams(max_new_tokens=24, temperature=0, stop_ids=(stop,)),
                       decode_loop="static")
    for free, cut in zip(static, stopped):
        n = free.tokens.index(stop) + 1 if stop in free.tokens else len(free.tokens)
        assert cut.tokens == free.tokens[:n] and cut.finished == (stop in free.tokens)
    sampled = SamplingParams(max_new_tokens=24, temperature=1.0, seed=3)
    a, b = (generate(model, prompts, sampled, decode_loop="static", logprobs=True) for _ in range(2))
    assert [g.tokens for g in a] == [g.tokens for g in b]  # seeded: the replay is deterministic


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
