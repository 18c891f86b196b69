"""Benchmark: generation tokens/s of fastgpt's KV-cache engine vs Hugging Face ``generate``.

Both run the same random-weight GPT-2 (fastgpt's model exported with :func:`fastgpt.hf.save_hf_gpt2`
and loaded as ``GPT2LMHeadModel``), greedy, equal-length prompts, a fixed number of new tokens (no
stop token), bf16 on CUDA.  Reported per (impl, batch): tokens/s and, on CUDA, MBU -- the bytes a
decode step must read (all weights once + the KV cache so far) per second, over the H100's
3.35e12 B/s peak.  The CUDA cases (gpt2-small, batch 1 / 64 / 512) are skipped without a GPU; a
tiny CPU case runs everywhere.  ``run_generation_benchmarks()`` returns the rows for a script.

    python -m pytest benchmarks/bench_generation.py -s
"""
from __future__ import annotations

import tempfile
import time

import pytest
import torch

from fastgpt.config import PRESETS, ModelConfig
from fastgpt.engine import SamplingParams, generate
from fastgpt.model import GPT

PEAK_BANDWIDTH = 3.35e12  # H100 SXM HBM3, bytes/s
TINY = ModelConfig(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hf_model(model: GPT, dtype: torch.dtype, device: torch.device):
    from transformers import GPT2LMHeadModel
    from fastgpt.hf import save_hf_gpt2
    with tempfile.TemporaryDirectory() as d:
        save_hf_gpt2(model, d)
        return GPT2LMHeadModel.from_pretrained(d, torch_dtype=dtype).to(device).eval()


def decode_bytes_per_step(cfg: ModelConfig, batch: int, context: float, elem: int) -> float:
    """Bytes one decode step reads: every weight once, plus each row's K and V so far."""
    with torch.device("meta"):  # count parameters without allocating them
        n_params = GPT(cfg).num_params(non_embedding=False)
    kv = 2 * cfg.n_layer * batch * context * cfg.kv_heads * cfg.head_dim
    return (n_params + kv) * elem


def run_generation_benchmarks(cfg: ModelConfig | None = None, batches: tuple[int, ...] = (1, 64, 512),
                              prompt_len: int = 64, new_tokens: int = 128, device: str = "cuda",
                              impls: tuple[str, ...] = ("fastgpt", "fastgpt_compiled", "hf"),
                              reps: int = 2) -> list[dict]:
    """Tokens/s (and MBU on CUDA) per implementation and batch size."""
    cfg = cfg or ModelConfig(**PRESETS["gpt2-small"]["model"])
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = GPT(cfg).to(dev).eval()
    hf = _hf_model(model, dtype, dev) if "hf" in impls else None
    model.to(dtype)
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g)
        for impl in impls:
            row = {"impl": impl, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                   "device": dev.type, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd}
            try:
                if impl.startswith("fastgpt"):
                    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
                    lists = prompts.tolist()
                    compiled = impl == "fastgpt_compiled"
                    if compiled and dev.type != "cuda":
                        continue
                    run = lambda: generate(model, lists, params, compile_decode=compiled)  # noqa: E731
                else:
                    ids = prompts.to(dev)
                    run = lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,  # noqa: E731
                                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                              pad_token_id=0)
                with torch.no_grad():
                    run()  # warm-up (compilation, allocator)
                    _sync(dev)
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        run()
                    _sync(dev)
                seconds = (time.perf_counter() - t0) / reps
                row["seconds"] = seconds
                row["tokens_per_s"] = batch * new_tokens / seconds
                if dev.type == "cuda":
                    step_bytes = decode_bytes_per_step(cfg, batch, prompt_len + new_tokens / 2, 2)
                    row["mbu"] = step_bytes * new_tokens / seconds / PEAK_BANDWIDTH
            except Exception as exc:  # e.g. OOM at batch 512 must not stop the other rows
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
    return rows


def _report(rows: list[dict]) -> None:
    for r in rows:
        extra = f" mbu={r['mbu']:.1%}" if "mbu" in r else ""
        print(f"{r['impl']:>17} batch={r['batch']:>4}: "
              + (f"{r['tokens_per_s']:>10.0f} tok/s{extra}" if "tokens_per_s" in r else r.get("error", "")))


def test_generation_cpu_tiny():
    rows = run_generation_benchmarks(TINY, batches=(1, 4), prompt_len=8, new_tokens=16, device="cpu", reps=1)
    _report(rows)
    assert {r["impl"] for r in rows} == {"fastgpt", "hf"} and all("tokens_per_s" in r for r in rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generation_gpt2_small_cuda():
    rows = run_generation_benchmarks()
    _report(rows)
    assert any("tokens_per_s" in r for r in rows)


if __name__ == "__main__":
    _report(run_generation_benchmarks() if torch.cuda.is_available()
            else run_generation_benchmarks(TINY, (1, 4), 8, 16, "cpu", reps=1))
