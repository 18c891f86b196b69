"""Batched generation with a pre-allocated KV cache.

Prompts of different lengths are prefilled together, packed in one row (varlen attention, no
padding compute); then every step decodes one token per row through the decode attention path,
which reads cache rows through an index (nothing is copied).  Two decode loops (``decode_loop``):
on a CPU, a row that emits a stop token or reaches ``max_new_tokens`` leaves the batch, so
finished rows cost nothing; on CUDA, where launching ~10 small kernels per layer per token costs
more than the arithmetic, every row runs every step and the fixed-shape step is replayed from a
captured CUDA graph.  Sampling (temperature, top-k, top-p, repetition penalty) draws from a
seeded ``torch.Generator``: same seed, same tokens.

Per token, the engine can report the log-probability of the chosen token under the distribution
it was sampled from (after temperature / top-k / top-p), and streams each token to ``on_token``
as soon as it exists.  ``compile_decode=True`` compiles the decode step with ``torch.compile``
instead (CUDA only; elsewhere the flag is ignored).
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .errors import FastGPTError
from .model import GPT, KVCache


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


# compiled decode steps per live model and shape mode (a finished model is not kept alive here)
_compiled_decode: "weakref.WeakKeyDictionary[GPT, dict[bool, Callable]]" = weakref.WeakKeyDictionary()


def _decode_fn(model: GPT, compile_decode: bool, dynamic: bool) -> Callable:
    """model.decode, compiled once per model on CUDA when asked: with dynamic shapes for the
    shrinking loop (its batch shrinks as rows finish, and recompiling per batch size would cost
    more than it saves), static ones for the static loop, which then captures it."""
    device = model.wte.weight.device
    if not compile_decode or device.type != "cuda":
        return model.decode
    compiled = _compiled_decode.setdefault(model, {})
    if dynamic not in compiled:
        compiled[dynamic] = torch.compile(model.decode, dynamic=dynamic)
    return compiled[dynamic]


def check_prompts(model: GPT, prompts: Sequence[Sequence[int]]) -> None:
    """Raise GenerationError for an empty prompt or one that leaves no room to generate."""
    block = model.config.block_size
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty")
        if len(p) >= block:
            raise GenerationError(f"prompt {i} has {len(p)} tokens; the model's context is {block} "
                                  f"tokens, so at most {block - 1} fit with room to answer")


DECODE_LOOPS = ("auto", "shrinking", "static")
STATIC_CHECK_EVERY = 4  # static loop: look for "every row finished" once per this many steps


@dataclass
class _Decoding:
    """What both decode loops share for one batch of prompts."""
    model: GPT
    decode: Callable
    cache: KVCache
    params: SamplingParams
    gen: torch.Generator | None
    seen: torch.Tensor | None
    stop: torch.Tensor
    vocab_limit: int | None
    max_new: int
    on_token: Callable[[int, int], None] | None
    logprobs: bool

    def autocast(self):
        return decode_autocast(self.cache.k.device)

    def sample(self, logits: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = logits.float()
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit:] = float("-inf")
        tokens, lps = sample_next(logits, self.params, self.gen,
                                  None if self.seen is None else self.seen[rows], self.logprobs)
        if self.seen is not None:
            self.seen[rows, tokens] = True
        return tokens, lps


def decode_autocast(device: torch.device):
    """bf16 autocast on CUDA (nothing elsewhere) for prefill and decode steps; cache_enabled=False:
    autocast's cast cache must not outlive a CUDA-graph capture."""
    return (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if device.type == "cuda"
            else contextlib.nullcontext())


def _choose_loop(decode_loop: str, device: torch.device) -> str:
    if decode_loop not in DECODE_LOOPS:
        raise GenerationError(f"decode_loop={decode_loop!r}: expected one of {', '.join(DECODE_LOOPS)}")
    if decode_loop != "auto":
        return decode_loop
    return "static" if device.type == "cuda" else "shrinking"


@torch.no_grad()
def generate(model: GPT, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
             vocab_limit: int | None = None, batch_size: int = 0,
             on_token: Callable[[int, int], None] | None = None, logprobs: bool = False,
             compile_decode: bool = False, decode_loop: str = "auto") -> list[Generation]:
    """Sample a continuation for every prompt (lists of token ids).

    ``vocab_limit`` masks ids at and above it (the model's vocabulary may be padded past the
    tokenizer's). ``batch_size`` > 0 splits the prompts into batches of that many rows.
    ``on_token(prompt_index, token)`` is called for every new token (streaming output).
    ``logprobs`` fills each Generation's per-token log-probs. Generation stops at
    ``max_new_tokens`` or when the longest prompt's row reaches the model's context.

    ``decode_loop`` (same tokens either way under greedy decoding):

    * ``"shrinking"``: finished rows leave the batch; one device->host sync per step.  Least
      compute: the default off CUDA, where compute, not kernel launches, is the cost.
    * ``"static"``: every row decodes every step (a finished row's extra tokens are dropped), so
      the step has fixed shapes and on CUDA runs as one captured CUDA graph instead of ~10
      kernel launches per layer; finished rows are checked once per ``STATIC_CHECK_EVERY``
      steps.  The default on CUDA (benchmarks/results/2026-11-27-NVIDIA-H200.md: the captured
      step generated 5-7x the tokens/s of the shrinking loop for gpt2-small at batch 1 and 64).
    * ``"auto"``: static on CUDA, shrinking elsewhere.

    ``compile_decode`` (CUDA only) compiles the decode step with ``torch.compile``; the static
    loop then captures the compiled step (fused kernels, launched as one graph).
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
                            compile_decode=compile_decode, decode_loop=decode_loop)
        return out
    device = model.wte.weight.device
    loop = _choose_loop(decode_loop, device)
    longest = max(len(p) for p in prompts)
    max_new = min(params.max_new_tokens, model.config.block_size - longest)
    B = len(prompts)
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device).manual_seed(params.seed)
    was_training = model.training
    model.eval()
    cache = model.new_cache(B, longest + max_new,
                            dtype=torch.bfloat16 if device.type == "cuda" else None)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, torch.as_tensor(list(p), device=device)] = True
    decode = _decode_fn(model, compile_decode, dynamic=loop == "shrinking")
    run = _Decoding(model, decode, cache, params, gen, seen,
                    torch.tensor(list(params.stop_ids) or [-1], device=device), vocab_limit, max_new,
                    on_token, logprobs)
    try:
        with run.autocast():
            logits = model.prefill([list(p) for p in prompts], cache, torch.arange(B, device=device))
        return (_static_loop if loop == "static" else _shrinking_loop)(run, logits)
    finally:
        model.train(was_training)


def _shrinking_loop(run: _Decoding, logits: torch.Tensor) -> list[Generation]:
    """Finished rows leave the batch: the decode step reads cache rows through ``active``."""
    results = [Generation() for _ in range(logits.shape[0])]
    active = torch.arange(logits.shape[0], device=logits.device)
    for step in range(run.max_new):
        tokens, lps = run.sample(logits, active)
        done = torch.isin(tokens, run.stop)
        # one device->host sync per step for the whole batch
        tokens_list, done_list, rows_list = tokens.tolist(), done.tolist(), active.tolist()
        lp_list = lps.tolist() if lps is not None else None
        for j, (row, tok, d) in enumerate(zip(rows_list, tokens_list, done_list)):
            results[row].tokens.append(tok)
            results[row].finished = d
            if lp_list is not None:
                results[row].logprobs.append(lp_list[j])
            if run.on_token is not None:
                run.on_token(row, tok)
        if all(done_list) or step == run.max_new - 1:  # host-side: no second sync per token
            break
        keep = ~done
        active, tokens = active[keep], tokens[keep]
        with run.autocast():
            logits = run.decode(tokens[:, None], run.cache, active)[:, -1]
    return results


def capture_step(step: Callable[[], torch.Tensor | None], cache: KVCache) -> Callable[[], torch.Tensor | None]:
    """``step`` (a decode step on ``cache``, CUDA) captured as a CUDA graph: one warm-up run on a
    side stream compiles its kernels, then the capture records it.  Calling the result replays
    the graph and returns what the captured call returned (static buffers, rewritten by every
    replay).  The cache's fill levels are left as they were, also when capture fails (raises)."""
    filled = cache.seqlens.clone()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        cache.seqlens.copy_(filled)  # undo the warm-up step
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = step()
    finally:
        cache.seqlens.copy_(filled)  # capture records the step without running it

    def replay() -> torch.Tensor | None:
        graph.replay()
        return output
    return replay


def _static_step(run: _Decoding, token: torch.Tensor, rows: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The decode step of all rows from the token buffer ``token`` (B, 1): logits (B, V).  On
    CUDA it is captured once as a CUDA graph and replayed (its output is the graph's static
    logits buffer); if compiling or capturing fails, the plain step runs, with a warning."""
    def step_of(decode: Callable) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            with run.autocast():
                return decode(token, run.cache, rows)[:, -1]
        return step

    step = step_of(run.decode)
    if token.device.type != "cuda":
        return step
    try:
        return capture_step(step, run.cache)
    except RuntimeError as err:  # e.g. a model whose step syncs with the host, a failed compile
        warnings.warn(f"generation: decoding without a CUDA graph, its capture failed: "
                      f"{str(err).splitlines()[0] if str(err) else type(err).__name__}",
                      RuntimeWarning, stacklevel=4)
        return step_of(run.model.decode)


def _static_loop(run: _Decoding, logits: torch.Tensor) -> list[Generation]:
    """Every row decodes every step; tokens and log-probs stay on the device until the end."""
    B, device = logits.shape[0], logits.device
    rows = torch.arange(B, device=device)
    out = torch.empty(B, run.max_new, dtype=torch.long, device=device)
    out_lp = torch.empty(B, run.max_new, dtype=torch.float32, device=device) if run.logprobs else None
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    token = torch.empty(B, 1, dtype=torch.long, device=device)  # the step's input buffer
    step_fn = None
    streamed = [False] * B  # streaming: rows already finished on the host's side
    steps = 0
    for i in range(run.max_new):
        tokens, lps = run.sample(logits, rows)
        out[:, i] = tokens
        if out_lp is not None:
            out_lp[:, i] = lps
        finished |= torch.isin(tokens, run.stop)
        steps = i + 1
        if run.on_token is not None:  # streaming needs this step's tokens on the host now
            for row, (tok, d) in enumerate(zip(tokens.tolist(), finished.tolist())):
                if not streamed[row]:
                    run.on_token(row, tok)
                    streamed[row] = d
        if i == run.max_new - 1 or ((i + 1) % STATIC_CHECK_EVERY == 0 and bool(finished.all())):
            break
        token.copy_(tokens[:, None])
        if step_fn is None:  # after the first tokens exist: capture warms up on real inputs
            step_fn = _static_step(run, token, rows)
        logits = step_fn()
    # one transfer at the end; a row keeps its tokens up to and including its first stop token
    tokens_list = out[:, :steps].tolist()
    lp_list = out_lp[:, :steps].tolist() if out_lp is not None else None
    stop_ids = set(run.params.stop_ids)
    results = []
    for row, toks in enumerate(tokens_list):
        n = next((j + 1 for j, t in enumerate(toks) if t in stop_ids), len(toks))
        results.append(Generation(tokens=toks[:n], finished=toks[n - 1] in stop_ids,
                                  logprobs=lp_list[row][:n] if lp_list is not None else []))
    return results
