"""GPT model: shapes, packed batches, variants, KV cache, FLOPs, tying, and that it can learn."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastgpt.config import ConfigError, ModelConfig
from fastgpt.model import (GPT, ScalarModel, cu_seqlens_from_lengths, positions_from_cu_seqlens)

VARIANTS = {
    "gpt2": dict(),
    "rope": dict(position="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "gqa": dict(n_head=4, n_kv_head=2),
    "modern": dict(position="rope", norm="rmsnorm", mlp="swiglu", n_head=4, n_kv_head=1, bias=False,
                   tie_embeddings=False),
}


def make(cfg: ModelConfig, seed: int = 0, **changes) -> GPT:
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(cfg, **changes)).eval()


def randomize_(model: torch.nn.Module, seed: int = 1) -> None:
    """Perturb norms and biases so that a wrong mapping cannot hide behind ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def ids(shape, vocab=320, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_plain_and_packed(tiny_cfg, variant):
    model = make(tiny_cfg, **VARIANTS[variant])
    x = ids((3, 20))
    logits, loss = model(x)
    assert logits.shape == (3, 20, 320) and loss is None
    _, loss = model(x, x)
    assert loss.dim() == 0 and torch.isfinite(loss)
    _, per_tok = model(x, x, reduction="none")
    assert per_tok.shape == (3, 20)
    cu = cu_seqlens_from_lengths([5, 15, 20, 7, 13], None)
    logits, _ = model(x, cu_seqlens=cu, max_seqlen=20)
    assert logits.shape == (3, 20, 320)


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_equals_separate(tiny_cfg, variant):
    """Sequences packed in one row give the logits and per-token losses of separate runs."""
    model = make(tiny_cfg, **VARIANTS[variant])
    randomize_(model)
    lengths = [7, 12, 1, 20]
    seqs = [ids((1, n), seed=i) for i, n in enumerate(lengths)]
    tgts = [ids((1, n), seed=10 + i) for i, n in enumerate(lengths)]
    packed, targets = torch.cat(seqs, 1), torch.cat(tgts, 1)
    cu = cu_seqlens_from_lengths(lengths, None)
    with torch.no_grad():
        logits, _ = model(packed, cu_seqlens=cu, max_seqlen=max(lengths))
        _, loss = model(packed, targets, cu_seqlens=cu, max_seqlen=max(lengths), reduction="none")
        for i, (s, t) in enumerate(zip(seqs, tgts)):
            a, b = int(cu[i]), int(cu[i + 1])
            ref_logits, _ = model(s)
            _, ref_loss = model(s, t, reduction="none")
            torch.testing.assert_close(logits[:, a:b], ref_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(loss[:, a:b], ref_loss, atol=1e-5, rtol=1e-5)


def test_packed_rows_batch(tiny_cfg):
    """(B, T) rows each holding several sequences: boundaries at row starts too."""
    model = make(tiny_cfg)
    x = ids((2, 10))
    cu = cu_seqlens_from_lengths([4, 6, 10], None)
    with torch.no_grad():
        logits, _ = model(x, cu_seqlens=cu, max_seqlen=10)
        torch.testing.assert_close(logits[0, :4], model(x[:1, :4])[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[0, 4:], model(x[:1, 4:])[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[1], model(x[1:])[0][0], atol=1e-5, rtol=1e-5)


def test_positions_restart_at_boundaries():
    cu = cu_seqlens_from_lengths([3, 1, 4], None)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 8]
    assert positions_from_cu_seqlens(cu, 8).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


def test_ignore_index_and_mean_reduction(tiny_cfg):
    model = make(tiny_cfg)
    x, y = ids((2, 8)), ids((2, 8), seed=3)
    y_masked = y.clone()
    y_masked[:, :4] = -100
    with torch.no_grad():
        _, per = model(x, y, reduction="none")
        _, mean_masked = model(x, y_masked)
        _, per_masked = model(x, y_masked, reduction="none")
    assert (per_masked[:, :4] == 0).all()
    torch.testing.assert_close(mean_masked, per[:, 4:].mean())


@pytest.mark.parametrize("variant", ["gpt2", "modern"])
def test_kv_cache_prefill_decode_matches_full_forward(tiny_cfg, variant):
    model = make(tiny_cfg, **VARIANTS[variant])
    randomize_(model)
    prompts = [ids((9,), seed=1).tolist(), ids((4,), seed=2).tolist(), ids((13,), seed=3).tolist()]
    extra = ids((3, 5), seed=4)
    cache = model.new_cache(rows=4, max_len=32)
    rows = torch.tensor([2, 0, 3])
    with torch.no_grad():
        last = model.prefill(prompts, cache, rows)
        for i, p in enumerate(prompts):
            full, _ = model(torch.tensor([p]))
            torch.testing.assert_close(last[i], full[0, -1], atol=1e-5, rtol=1e-5)
        # decode one token at a time, then two at once
        steps = []
        for t in range(3):
            steps.append(model.decode(extra[:, t:t + 1], cache, rows))
        steps.append(model.decode(extra[:, 3:5], cache, rows))
        got = torch.cat(steps, 1)  # (3, 5, V)
        for i, p in enumerate(prompts):
            seq = torch.tensor([p + extra[i].tolist()])
            full, _ = model(seq)
            torch.testing.assert_close(got[i], full[0, len(p):], atol=1e-5, rtol=1e-5)
    assert cache.seqlens.tolist() == [4 + 5, 0, 9 + 5, 13 + 5]


def test_cache_longer_than_block_size_rejected(tiny_cfg):
    with pytest.raises(ValueError, match="block_size"):
        make(tiny_cfg).new_cache(1, tiny_cfg.block_size + 1)


def test_scalar_model(tiny_cfg):
    torch.manual_seed(0)
    m = ScalarModel(tiny_cfg)
    x = ids((3, 11))
    out = m(x)
    assert out.shape == (3, 11) and out.dtype == torch.float32
    cu = cu_seqlens_from_lengths([5, 6, 11, 11], None)
    packed = m(x, cu_seqlens=cu, max_seqlen=11)
    torch.testing.assert_close(packed[0, 5:], m(x[:1, 5:])[0], atol=1e-5, rtol=1e-5)
    assert m.config is m.gpt.config


def test_flops_per_token(tiny_cfg):
    m = make(tiny_cfg)
    n = sum(p.numel() for p in m.parameters()) - m.wpe.weight.numel()  # tied: wte counted once
    assert m.num_params() == n
    assert m.num_params(non_embedding=False) == n + m.wpe.weight.numel()
    L, H, Q, T = 2, 2, 16, 64
    assert m.flops_per_token() == 6 * n + 12 * L * H * Q * T
    assert m.flops_per_token(32) == 6 * n + 12 * L * H * Q * 32


def test_gpt2_small_param_count():
    cfg = ModelConfig(vocab_size=50257, block_size=1024)
    with torch.device("meta"):
        m = GPT(cfg)
    assert sum(p.numel() for p in m.parameters()) == 124_439_808  # GPT-2 small, as published


def test_tied_weights(tiny_cfg):
    m = make(tiny_cfg)
    assert m.lm_head.weight is m.wte.weight
    untied = make(tiny_cfg, tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight
    # a gradient through the head reaches the shared embedding
    m.train()
    _, loss = m(ids((1, 6)), ids((1, 6), seed=1))
    loss.backward()
    assert m.wte.weight.grad is not None and m.wte.weight.grad.abs().sum() > 0


def test_residual_init_scaled(tiny_cfg):
    m = make(tiny_cfg, n_layer=8)
    std = m.blocks[0].attn.proj.weight.std().item()
    assert std == pytest.approx(0.02 / 4, rel=0.2)


def test_invalid_model_config():
    with pytest.raises(ConfigError, match="n_head"):
        ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(ConfigError, match="n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3, n_embd=32)
    with pytest.raises(ConfigError, match="model.norm"):
        ModelConfig(norm="batchnorm")
    with pytest.raises(ConfigError, match="model.n_head"):
        ModelConfig(n_head=0)
    with pytest.raises(ConfigError, match="rope"):
        ModelConfig(n_embd=6, n_head=2, position="rope")  # head_dim 3 cannot be rotated in pairs


@pytest.mark.parametrize("variant", ["gpt2", "modern"])
def test_overfits_one_batch(tiny_cfg, variant):
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(tiny_cfg, **VARIANTS[variant]))
    x = ids((2, 32), seed=5)
    y = torch.roll(x, -1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()


def test_doc_ids_give_the_same_boundaries_as_cu_seqlens(tiny_cfg):
    from fastgpt.model import cu_seqlens_from_doc_ids
    torch.manual_seed(0)
    model = GPT(tiny_cfg).eval()
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [2, 2, 3, 3, 3, 3, 4, 4]])
    cu = cu_seqlens_from_doc_ids(doc_ids)
    # a row start is always a boundary, even when the id carries over from the previous row
    assert cu.tolist() == [0, 3, 5, 8, 10, 14, 16]
    idx = torch.randint(0, tiny_cfg.vocab_size, (2, 8))
    a, _ = model(idx, doc_ids=doc_ids)
    b, _ = model(idx, cu_seqlens=cu)
    assert torch.equal(a, b)


@pytest.mark.parametrize("variant", ["gpt2", "modern"])
def test_grad_checkpointing_gives_identical_gradients(tiny_cfg, variant):
    """Recomputing each block in backward (with dropout: the saved RNG state replays its masks)
    gives bit-identical loss and gradients on packed rows."""
    cfg = dataclasses.replace(tiny_cfg, **VARIANTS[variant], dropout=0.1)
    idx = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    cu = cu_seqlens_from_lengths([10, 14, 24]).to(torch.int32)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg).train()
        model.grad_checkpointing = checkpointing
        torch.manual_seed(1)  # the same dropout masks in both runs
        _, loss = model(idx, idx, cu_seqlens=cu)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, a), (loss_b, b) = grads
    assert torch.equal(loss_a, loss_b)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_trainer_switches_grad_checkpointing(tiny_cfg):
    from fastgpt.config import TrainConfig
    from fastgpt.trainer import Trainer
    model = ScalarModel(tiny_cfg)
    Trainer(TrainConfig(grad_checkpointing=True, device="cpu", resume=False, out_dir="unused"), model, task=None,
            stage="t", tokenizer=None)
    assert model.gpt.grad_checkpointing
