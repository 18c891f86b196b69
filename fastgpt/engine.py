"""Batched generation with a pre-allocated KV cache.

Prompts of different lengths are prefilled together, packed in one row (varlen attention, no
padding compute); then every step decodes one token per unfinished row through the decode
attention path.  A row that emits a stop token (the end-of-turn token by default) or reaches
``max_new_tokens`` leaves the active set: the decode step reads cache rows through an index, so
finished rows cost no work and nothing is copied.  Sampling (temperature, top-k, top-p,
repetition penalty) draws from a seeded ``torch.Generator``: same seed, same tokens.

Per token, the engine can report the log-probability of the chosen token under the distribution
it was sampled from (after temperature / top-k / top-p), and streams each token to ``on_token``
as soon as it exists.  On CUDA the decode step can be compiled (``compile_decode=True``):
decoding one token is a long chain of small kernels whose launch overhead dominates at small
batch, which is exactly what ``torch.compile`` fuses away; elsewhere the flag is ignored.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .errors import FastGPTError
from .model import GPT


class GenerationError(FastGPTError, ValueError):
    """A generation request that cannot run (one-line message)."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0        # 0 = greedy
    top_k: int = 0                  # 0 = off
    top_p: float = 1.0              # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the row
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={self.max_new_tokens}: expected >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise GenerationError("sampling: expected temperature >= 0, 0 < top_p <= 1, top_k >= 0, "
                                  "repetition_penalty > 0")


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)  # new tokens, the stop token included if emitted
    finished: bool = False                           # True when a stop token ended it
    logprobs: list[float] = field(default_factory=list)  # per token, when generate(logprobs=True)

    @property
    def finish_reason(self) -> str:
        """"stop" (a stop token) or "length" (max_new_tokens or the context ran out)."""
        return "stop" if self.finished else "length"


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """Apply repetition penalty, temperature, top-k and top-p to fp32 logits (B, V)."""
    if seen is not None and params.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.temperature == 0:
        return logits
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already hold top_p of the mass
        drop = (torch.cumsum(probs, dim=-1) - probs) > params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None,
                seen: torch.Tensor | None = None, with_logprobs: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next token per row, and (optionally) its log-prob under the processed distribution."""
    logits = process_logits(logits.float(), params, seen)
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        tokens = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen).squeeze(-1)
    logprobs = None
    if with_logprobs:
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs


# compiled decode steps, one per live model (a finished model is not kept alive by this cache)
_compiled_decode: "weakref.WeakKeyDictionary[GPT, Callable]" = weakref.WeakKeyDictionary()


def _decode_fn(model: GPT, compile_decode: bool) -> Callable:
    """model.decode, compiled once per model on CUDA when asked (dynamic shapes: the active
    batch shrinks as rows finish, and recompiling per batch size would cost more than it saves)."""
    device = model.wte.weight.device
    if not compile_decode or device.type != "cuda":
        return model.decode
    if model not in _compiled_decode:
        _compiled_decode[model] = torch.compile(model.decode, dynamic=True)
    return _compiled_decode[model]


def check_prompts(model: GPT, prompts: Sequence[Sequence[int]]) -> None:
    """Raise GenerationError for an empty prompt or one that leaves no room to generate."""
    block = model.config.block_size
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty")
        if len(p) >= block:
            raise GenerationError(f"prompt {i} has {len(p)} tokens; the model's context is {block} "
                                  f"tokens, so at most {block - 1} fit with room to answer")


@torch.no_grad()
def generate(model: GPT, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
             vocab_limit: int | None = None, batch_size: int = 0,
             on_token: Callable[[int, int], None] | None = None, logprobs: bool = False,
             compile_decode: bool = False) -> list[Generation]:
    """Sample a continuation for every prompt (lists of token ids).

    ``vocab_limit`` masks ids at and above it (the model's vocabulary may be padded past the
    tokenizer's). ``batch_size`` > 0 splits the prompts into batches of that many rows.
    ``on_token(prompt_index, token)`` is called for every new token (streaming output).
    ``logprobs`` fills each Generation's per-token log-probs. Generation stops at
    ``max_new_tokens`` or when the longest prompt's row reaches the model's context.
    """
    if not prompts:
        return []
    check_prompts(model, prompts)
    if batch_size and len(prompts) > batch_size:
        out: list[Generation] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            cb = None if on_token is None else (lambda i, t, s=start: on_token(s + i, t))
            out += generate(model, chunk, params, vocab_limit=vocab_limit, on_token=cb, logprobs=logprobs,
                            compile_decode=compile_decode)
        return out
    device = model.wte.weight.device
    longest = max(len(p) for p in prompts)
    max_new = min(params.max_new_tokens, model.config.block_size - longest)
    B = len(prompts)
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device).manual_seed(params.seed)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    decode = _decode_fn(model, compile_decode)
    cache = model.new_cache(B, longest + max_new,
                            dtype=torch.bfloat16 if device.type == "cuda" else None)
    V = model.config.vocab_size
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, torch.as_tensor(list(p), device=device)] = True
    stop = torch.tensor(list(params.stop_ids) or [-1], device=device)
    results = [Generation() for _ in range(B)]
    active = torch.arange(B, device=device)
    try:
        with autocast:
            logits = model.prefill([list(p) for p in prompts], cache, active)
        for _ in range(max_new):
            logits = logits.float()
            if vocab_limit is not None and vocab_limit < V:
                logits[:, vocab_limit:] = float("-inf")
            tokens, lps = sample_next(logits, params, gen, None if seen is None else seen[active], logprobs)
            if seen is not None:
                seen[active, tokens] = True
            done = torch.isin(tokens, stop)
            # one device->host sync per step for the whole batch
            tokens_list, done_list, rows_list = tokens.tolist(), done.tolist(), active.tolist()
            lp_list = lps.tolist() if lps is not None else None
            for j, (row, tok, d) in enumerate(zip(rows_list, tokens_list, done_list)):
                results[row].tokens.append(tok)
                results[row].finished = d
                if lp_list is not None:
                    results[row].logprobs.append(lp_list[j])
                if on_token is not None:
                    on_token(row, tok)
            if all(done_list) or _ == max_new - 1:  # host-side: no second sync per token
                break
            keep = ~done
            active, tokens = active[keep], tokens[keep]
            with autocast:
                logits = decode(tokens[:, None], cache, active)[:, -1]
    finally:
        model.train(was_training)
    return results
