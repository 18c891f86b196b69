"""A decoder-only GPT, readable in one file.

GPT-2 layout by default (LayerNorm, GELU MLP, learned positions, tied embeddings); the modern
variant (RoPE, RMSNorm, SwiGLU, grouped-query attention) is chosen by :class:`ModelConfig`.
Attention runs through :func:`fastgpt.kernels.attention` (and ``decode_attention`` against a KV
cache), the training loss through :func:`fastgpt.kernels.linear_cross_entropy`, so the full
vocabulary logits are never materialised when targets are given.

Batches are either plain ``(B, T)`` rows or packed rows: several sequences concatenated, their
boundaries given as ``cu_seqlens`` (int32 offsets into the flattened B*T tokens; each row must
start a sequence) or as ``doc_ids`` (B, T), one id per token, a new sequence wherever it changes.  Positions restart at every boundary and no token attends across one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from . import kernels
from .config import ModelConfig


# ------------------------------------------------------------------------------ helpers
def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Position of each flattened token inside its own sequence, (n_tokens,) int64."""
    idx = torch.arange(n_tokens, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].contiguous().long(), idx, right=True)
    return idx - cu_seqlens.long()[seq]


def cu_seqlens_from_lengths(lengths: list[int] | torch.Tensor, device: torch.device | str | None = None
                            ) -> torch.Tensor:
    lengths = torch.as_tensor(lengths, dtype=torch.int32, device=device)
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boundaries of a (B, T) document-id layout: a sequence starts at every row start and
    wherever the id changes. Returns int32 offsets into the flattened B*T tokens."""
    B, T = doc_ids.shape
    starts = torch.ones(B, T, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    offsets = torch.nonzero(starts.reshape(-1)).flatten()
    return torch.cat([offsets, offsets.new_tensor([B * T])]).to(torch.int32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Rotation frequency of each pair of a head's dimensions, (head_dim / 2,) fp32, with the
    config's long-context scaling applied (the same frequencies Hugging Face models use)."""
    D = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2).float() / D)
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        # Wavelengths longer than the pre-training context are stretched by rope_factor, shorter
        # ones (the fine-grained positions) are kept, and a band in between is interpolated.
        wavelen = 2 * math.pi / inv_freq
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_context
        smooth = ((old / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        return (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq
    return inv_freq


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, frequency) up to the context, each (block_size, D/2)."""
    angles = torch.outer(torch.arange(cfg.block_size).float(), rope_frequencies(cfg))
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head; cos/sin broadcast as (..., T, 1, D/2).
    Dimension i pairs with i + D/2 (Hugging Face's rotate_half layout, not interleaved pairs), so
    imported Llama-family q/k weights are used as stored."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


# ------------------------------------------------------------------------------ KV cache
@dataclass
class KVCache:
    """Pre-allocated keys/values for generation: (n_layer, rows, max_len, n_kv_head, head_dim).

    ``seqlens[r]`` is how many positions of row r are filled.
    """

    k: torch.Tensor
    v: torch.Tensor
    seqlens: torch.Tensor  # (rows,) int32

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


@dataclass
class AttentionContext:
    """How the attention layers of one forward pass see their tokens."""

    cu_seqlens: torch.Tensor | None = None   # packed sequences (training, prefill)
    max_seqlen: int | None = None
    cache: KVCache | None = None
    cache_rows: torch.Tensor | None = None   # int64 (B,) cache row of each batch row
    decode: bool = False                     # True: idx are new tokens appended to the cache
    prefill_positions: torch.Tensor | None = None  # (N,) positions of packed prefill tokens
    prefill_rows: torch.Tensor | None = None       # (N,) cache row of each packed prefill token
    decode_positions: torch.Tensor | None = None   # (B, Tq) cache positions of the new tokens
    decode_lengths: torch.Tensor | None = None     # int32 (B,) cache length after appending them


# --------------------------------------------------------------------------------- layers
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.bias or cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.rope = cfg.position == "rope"

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                ctx: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, -1, self.head_dim).split(
            [self.n_head, self.n_kv_head, self.n_kv_head], dim=2)  # (B, T, H, D)
        if self.rope:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if ctx.decode:
            y = self._decode(q, k, v, ctx)
        else:
            if ctx.cache is not None:  # prefill: keep this layer's keys/values for decoding
                cache = ctx.cache
                shape = (-1, self.n_kv_head, self.head_dim)
                cache.k[self.layer, ctx.prefill_rows, ctx.prefill_positions] = k.reshape(shape).to(cache.k.dtype)
                cache.v[self.layer, ctx.prefill_rows, ctx.prefill_positions] = v.reshape(shape).to(cache.v.dtype)
            y = kernels.attention(q, k, v, causal=True, cu_seqlens=ctx.cu_seqlens,
                                  max_seqlen=ctx.max_seqlen)
        return self.proj(y.reshape(B, T, -1))

    def _decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        cache, rows, pos = ctx.cache, ctx.cache_rows, ctx.decode_positions
        cache.k[self.layer, rows[:, None], pos] = k.to(cache.k.dtype)
        cache.v[self.layer, rows[:, None], pos] = v.to(cache.v.dtype)
        return kernels.decode_attention(q, cache.k[self.layer], cache.v[self.layer], ctx.decode_lengths,
                                        cache_batch_idx=rows.to(torch.int32))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        up = 2 * cfg.hidden_dim if self.swiglu else cfg.hidden_dim
        self.up = nn.Linear(cfg.n_embd, up, bias=cfg.bias)
        self.down = nn.Linear(cfg.hidden_dim, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.swiglu:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h, approximate="tanh")
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), Attention(cfg, layer)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope, ctx))
        return x + self.drop(self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------------------- model
class GPT(nn.Module):
    """Token ids in, final hidden states / logits / loss out."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        # Activation checkpointing: keep only each block's input for backward and recompute the
        # block then, trading one more forward for most of the activation memory.
        self.grad_checkpointing = False
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.position == "rope":
            cos, sin = rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    # ---------------------------------------------------------------- sizes and FLOPs
    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N + 12 * L * H * Q * T (PaLM appendix B)."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * T

    # ---------------------------------------------------------------------- forward
    def head_operands(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (N, d), lm_head weight) for the fused loss / log-prob kernels, in the dtype
        ``F.linear`` would use: the kernels bypass autocast, so cast as autocast would (bf16
        matmuls under bf16 autocast; one dtype for both operands when weights are bf16)."""
        h = h.reshape(-1, h.shape[-1])
        weight = self.lm_head.weight
        if torch.is_autocast_enabled(h.device.type):
            dtype = torch.get_autocast_dtype(h.device.type)
        else:
            dtype = weight.dtype
        return h.to(dtype), weight.to(dtype)

    def hidden_states(self, idx: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, max_seqlen: int | None = None,
                      ctx: AttentionContext | None = None) -> torch.Tensor:
        """Final-normalised hidden states (B, T, n_embd) for ids (B, T)."""
        B, T = idx.shape
        if ctx is None:
            ctx = AttentionContext(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if position_ids is None:
            if cu_seqlens is not None:
                position_ids = positions_from_cu_seqlens(cu_seqlens, B * T).view(B, T)
            else:
                position_ids = torch.arange(T, device=idx.device).expand(B, T)
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        else:
            rope = (self.rope_cos[position_ids][:, :, None], self.rope_sin[position_ids][:, :, None])
        x = self.drop(x)
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:  # the saved RNG state replays dropout masks exactly in the recomputation
                x = torch.utils.checkpoint.checkpoint(block, x, rope, ctx, use_reentrant=False)
            else:
                x = block(x, rope, ctx)
        return self.norm_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                max_seqlen: int | None = None, reduction: str = "mean", ignore_index: int = -100,
                doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """nanoGPT-style ``(logits, loss)``. Packed rows: ``cu_seqlens`` or ``doc_ids``.

        With targets: ``(None, loss)`` through the fused linear cross-entropy (targets equal to
        ``ignore_index`` are not trained on; ``reduction`` as in the kernel). Without: ``(logits,
        None)`` with logits (B, T, V).
        """
        if doc_ids is not None and cu_seqlens is None:
            cu_seqlens = cu_seqlens_from_doc_ids(doc_ids)
        h = self.hidden_states(idx, cu_seqlens, position_ids, max_seqlen)
        if targets is None:
            return self.lm_head(h), None
        h2d, weight = self.head_operands(h)
        loss = kernels.linear_cross_entropy(h2d, weight, targets.reshape(-1), ignore_index=ignore_index,
                                            reduction=reduction)
        if reduction == "none":
            loss = loss.view(targets.shape)
        return None, loss

    def token_logprobs(self, idx: torch.Tensor, targets: torch.Tensor, *,
                       cu_seqlens: torch.Tensor | None = None, temperature: float = 1.0,
                       ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token (log p(target), entropy), each (B, T), via the fused linear log-prob kernel."""
        h2d, weight = self.head_operands(self.hidden_states(idx, cu_seqlens))
        lp, ent = kernels.linear_logprobs(h2d, weight, targets.reshape(-1), temperature=temperature,
                                          ignore_index=ignore_index)
        return lp.view(targets.shape), ent.view(targets.shape)

    # -------------------------------------------------------------------- generation
    def new_cache(self, rows: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        if max_len > c.block_size:  # learned positions and the RoPE tables both end there
            raise ValueError(f"cache length {max_len} exceeds the model's block_size {c.block_size}")
        ref = self.wte.weight
        shape = (c.n_layer, rows, max_len, c.kv_heads, c.head_dim)
        dtype = dtype or ref.dtype
        return KVCache(torch.zeros(shape, dtype=dtype, device=ref.device),
                       torch.zeros(shape, dtype=dtype, device=ref.device),
                       torch.zeros(rows, dtype=torch.int32, device=ref.device))

    def prefill(self, sequences: list[list[int]], cache: KVCache, rows: torch.Tensor) -> torch.Tensor:
        """Run prompts of different lengths packed in one row (no padding compute), fill their
        cache rows, and return the logits of each prompt's last token, (len(sequences), V)."""
        device = self.wte.weight.device
        lengths = [len(s) for s in sequences]
        if min(lengths) == 0:
            raise ValueError("cannot prefill an empty prompt")
        cu = cu_seqlens_from_lengths(lengths, device)
        idx = torch.tensor([t for s in sequences for t in s], dtype=torch.long, device=device)[None]
        positions = positions_from_cu_seqlens(cu, idx.shape[1])
        token_rows = torch.repeat_interleave(rows.to(device), torch.tensor(lengths, device=device))
        ctx = AttentionContext(cu_seqlens=cu, max_seqlen=max(lengths), cache=cache,
                               prefill_positions=positions, prefill_rows=token_rows)
        h = self.hidden_states(idx, cu, positions[None], max(lengths), ctx)
        cache.seqlens[rows] = torch.tensor(lengths, dtype=torch.int32, device=device)
        last = h[0, (cu[1:] - 1).long()]
        return self.lm_head(last)

    def decode(self, idx: torch.Tensor, cache: KVCache, rows: torch.Tensor) -> torch.Tensor:
        """Append ids (B, Tq) to cache rows ``rows`` (B,) and return their logits (B, Tq, V)."""
        B, T = idx.shape
        rows = rows.long()
        positions = cache.seqlens[rows].long()[:, None] + torch.arange(T, device=idx.device)  # (B, T)
        # computed once here, not in every layer: decode runs once per generated token
        ctx = AttentionContext(cache=cache, cache_rows=rows, decode=True, decode_positions=positions,
                               decode_lengths=(positions[:, -1] + 1).to(torch.int32))
        h = self.hidden_states(idx, position_ids=positions, ctx=ctx)
        cache.seqlens[rows] += T
        return self.lm_head(h)


class ScalarModel(nn.Module):
    """A GPT backbone with a scalar head: the reward model and the value model.

    ``forward`` returns one scalar per token, (B, T); a reward is read at a response's last token.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gpt = GPT(cfg)
        self.head = nn.Linear(cfg.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(cfg.n_embd + 1))
        nn.init.zeros_(self.head.bias)
        self.trainable()

    def trainable(self) -> "ScalarModel":
        """Every parameter trainable except an untied ``lm_head``: the scalar head reads the
        hidden states, so it never gets a gradient (DDP would wait for one forever)."""
        for p in self.parameters():
            p.requires_grad_(True)
        if not self.config.tie_embeddings:
            self.gpt.lm_head.weight.requires_grad_(False)
        return self

    @property
    def config(self) -> ModelConfig:
        return self.gpt.config

    def forward(self, idx: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        h = self.gpt.hidden_states(idx, cu_seqlens, position_ids, max_seqlen)
        return self.head(h).squeeze(-1).float()
