"""``fastgpt plan``: does a model fit one GPU for a stage, and with how large a micro-batch?

The estimate counts the bytes fastgpt itself holds, term by term, for the way it trains:

* trainable models keep fp32 master weights, fp32 gradients and AdamW's two fp32 moments
  (16 bytes per parameter) and, under bf16 autocast, a bf16 copy of every weight that the
  linear layers save for backward (2 more);
* frozen models (PPO's SFT reference and reward model) are cast to bf16: 2 bytes per parameter;
* activations are the tensors autograd saves per token, summed op by op for fastgpt's layers
  (:func:`activation_bytes`): the fp32 residual stream at each norm, each linear layer's input,
  the fused attention kernel's q, k, v, output and log-sum-exp, the SwiGLU / GELU intermediates,
  and at the top the fused loss's hidden-state gradient (the vocabulary logits are never stored,
  only one chunk of at most 256 MiB while the loss runs);
* with ``grad_checkpointing`` only each block's input is kept, plus one block recomputed at a time;
* PPO's rollouts add the KV cache: layers x rows x (prompt + answer) x key/value heads x head
  size x 2 (keys and values) x 2 bytes (bf16).

``fsdp=N`` counts one of N GPUs of a sharded run (``--fsdp`` under torchrun): weights, AdamW
state and gradients of the trained models are split N ways; what is whole on a GPU at a time is
the root's parameters (embeddings, final norm, heads) and two blocks (the one computing and the
one being gathered), in bf16, and their fp32 gradients before they are reduce-scattered. Frozen
models stay whole on every GPU, and PPO's generation adds an unsharded bf16 copy of the policy.

``backend="reference"`` counts what the CPU path holds instead (fp32, the reference attention's
expanded keys and values, full logits and their gradient); a test checks that estimate against
the process's measured peak memory on the CPU, and ``benchmarks``-style GPU runs against CUDA's
peak.  Nothing here allocates a tensor: models are sized on the meta device.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import ModelConfig, PRESETS
from .errors import FastGPTError

GB = 1e9
CHUNK_BYTES = 256 * 2**20  # the fused loss's logits chunk (kernels/triton_cross_entropy.py)

# Public configurations of models people fine-tune (config.json of each, reduced to fastgpt's fields).
_LLAMA = dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False, dropout=0.0)
KNOWN_MODELS: dict[str, dict] = {
    "SmolLM2-135M": dict(_LLAMA, vocab_size=49152, n_embd=576, mlp_hidden=1536, n_layer=30, n_head=9, n_kv_head=3,
                         block_size=8192, tie_embeddings=True, rope_theta=100000.0, norm_eps=1e-5),
    "SmolLM2-360M": dict(_LLAMA, vocab_size=49152, n_embd=960, mlp_hidden=2560, n_layer=32, n_head=15, n_kv_head=5,
                         block_size=8192, tie_embeddings=True, rope_theta=100000.0, norm_eps=1e-5),
    "SmolLM2-1.7B": dict(_LLAMA, vocab_size=49152, n_embd=2048, mlp_hidden=8192, n_layer=24, n_head=32, n_kv_head=32,
                         block_size=8192, tie_embeddings=True, rope_theta=130000.0, norm_eps=1e-5),
    "Qwen2.5-0.5B": dict(_LLAMA, vocab_size=151936, n_embd=896, mlp_hidden=4864, n_layer=24, n_head=14, n_kv_head=2,
                         block_size=32768, tie_embeddings=True, qkv_bias=True, rope_theta=1e6, norm_eps=1e-6),
    "Qwen2.5-1.5B": dict(_LLAMA, vocab_size=151936, n_embd=1536, mlp_hidden=8960, n_layer=28, n_head=12, n_kv_head=2,
                         block_size=32768, tie_embeddings=True, qkv_bias=True, rope_theta=1e6, norm_eps=1e-6),
    "Qwen2.5-7B": dict(_LLAMA, vocab_size=152064, n_embd=3584, mlp_hidden=18944, n_layer=28, n_head=28, n_kv_head=4,
                       block_size=32768, tie_embeddings=False, qkv_bias=True, rope_theta=1e6, norm_eps=1e-6),
    "Llama-3.2-1B": dict(_LLAMA, vocab_size=128256, n_embd=2048, mlp_hidden=8192, n_layer=16, n_head=32, n_kv_head=8,
                         block_size=131072, tie_embeddings=True, rope_theta=500000.0, norm_eps=1e-5,
                         rope_scaling="llama3", rope_factor=32.0),
    "Llama-3.2-3B": dict(_LLAMA, vocab_size=128256, n_embd=3072, mlp_hidden=8192, n_layer=28, n_head=24, n_kv_head=8,
                         block_size=131072, tie_embeddings=True, rope_theta=500000.0, norm_eps=1e-5,
                         rope_scaling="llama3", rope_factor=32.0),
    "Llama-3.1-8B": dict(_LLAMA, vocab_size=128256, n_embd=4096, mlp_hidden=14336, n_layer=32, n_head=32, n_kv_head=8,
                         block_size=131072, tie_embeddings=False, rope_theta=500000.0, norm_eps=1e-5,
                         rope_scaling="llama3", rope_factor=8.0),
    "Mistral-7B": dict(_LLAMA, vocab_size=32768, n_embd=4096, mlp_hidden=14336, n_layer=32, n_head=32, n_kv_head=8,
                       block_size=32768, tie_embeddings=False, rope_theta=1e6, norm_eps=1e-5),
}
STAGES = ("pretrain", "sft", "reward", "ppo")


class PlanError(FastGPTError, ValueError):
    """A plan request that cannot be answered (one-line message)."""


def model_config(name: str) -> ModelConfig:
    """A known model's name, a preset, ``hf:FOLDER`` or a fastgpt checkpoint, as a ModelConfig."""
    if name in KNOWN_MODELS:
        return ModelConfig(**KNOWN_MODELS[name])
    if name in PRESETS:
        return ModelConfig(**PRESETS[name]["model"])
    if name.startswith("hf:"):
        from .hf import read_hf_config
        return read_hf_config(name[3:])[0]
    if Path(name).exists():
        from .checkpoint import load_checkpoint, model_config_of
        return model_config_of(load_checkpoint(name))
    raise PlanError(f"--model {name}: not a known model ({', '.join(KNOWN_MODELS)}), a preset "
                    f"({', '.join(PRESETS)}), hf:FOLDER or a checkpoint")


def parse_size(text: str) -> float:
    """'80GB', '80G', '24GiB', '80' (GB) -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*(GiB|GB|G|MiB|MB|M)?\s*", text, re.IGNORECASE)
    if not m:
        raise PlanError(f"--gpu-memory {text!r}: expected a size such as 80GB or 24GiB")
    unit = (m.group(2) or "GB").lower()
    scale = {"gib": 2**30, "gb": 1e9, "g": 1e9, "mib": 2**20, "mb": 1e6, "m": 1e6}[unit]
    return float(m.group(1)) * scale


def num_params(cfg: ModelConfig) -> int:
    """Parameters of fastgpt's GPT for ``cfg`` (tied embeddings once), sized on the meta device."""
    return sum(param_split(cfg))


def param_split(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters outside the blocks, parameters of all blocks), sized on the meta device."""
    import torch
    from .model import GPT
    with torch.device("meta"):
        model = GPT(cfg)
    blocks = sum(p.numel() for p in model.blocks.parameters())
    return sum(p.numel() for p in model.parameters()) - blocks, blocks


# --------------------------------------------------------------------------- activations
def activation_bytes(cfg: ModelConfig, *, lm_loss: bool, amp: bool = True, backend: str = "fused",
                     dropout: float = 0.0) -> tuple[float, float]:
    """Bytes autograd saves per token in one forward, (per block, above the blocks), of a model
    trained with a language-model loss (``lm_loss``) or a scalar head; ``dropout`` is the rate
    the stage trains with.

    ``backend`` "fused" is the GPU path (fastgpt's Triton kernels), "reference" the CPU path.
    """
    d, h, H, D = cfg.n_embd, cfg.hidden_dim, cfg.n_head, cfg.head_dim
    kv = cfg.kv_heads * D
    swiglu, rms, rope = cfg.mlp == "swiglu", cfg.norm == "rmsnorm", cfg.position == "rope"
    masks = 2 * d if dropout > 0 else 0  # bool masks after attention and after the MLP
    if backend == "fused":
        e = 2 if amp else 4  # a compute-dtype element; the residual stream is always fp32
        norms = 2 * (4 * d + (4 if rms else 8))  # each norm's fp32 input and its statistics
        attention = (e * d               # qkv input (the norm output, cast)
                     + e * (d + 2 * kv)  # qkv output: v is a view of it, kept by the kernel
                     + (e * (d + kv) if rope else 0)  # q and k after RoPE
                     + e * d             # attention output = the projection's input
                     + 4 * H)            # log-sum-exp per head
        mlp = e * d + (4 * e * h if swiglu else 2 * e * h)  # up input; SwiGLU: up output (2h), silu, down
        layer = norms + attention + mlp + masks              # input; GELU: its input and the down input
        top = 4 * d + (4 if rms else 8) + (4 * D if rope else 0) + (d if dropout > 0 else 0)
        if lm_loss:
            top += 2 * e * d  # the hidden states cast for the loss, and the gradient it saves
    elif backend == "reference":
        # fp32 throughout. SDPA keeps q, the keys and values expanded to every query head, its
        # output and a contiguous copy for the projection; the loss keeps the full logits.
        # Coefficients measured with saved-tensor hooks on this path (torch 2.13).
        layer = 40 * d + (16 * h if swiglu else 8 * h) + 4 * H + (8 if rms else 16) + masks
        top = (12 * d + 4 * D + 25 if rope else 8 * d + 37) + (4 * cfg.vocab_size if lm_loss else 0)
    else:
        raise PlanError(f"backend {backend!r}: expected 'fused' or 'reference'")
    return layer, top


def loss_bytes(cfg: ModelConfig, amp: bool, backend: str) -> tuple[float, float]:
    """(bytes per token, fixed bytes) the language-model loss holds while it runs. Fused: one
    logits chunk of at most 256 MiB, the fp32 weight-gradient accumulator and the gradient it
    keeps. Reference: the softmax of the full logits and the temporaries of its backward, four
    (tokens, V) fp32 tensors (measured)."""
    if backend == "reference":
        return 4 * 4.0 * cfg.vocab_size, 0.0
    e = 2 if amp else 4
    return 0.0, CHUNK_BYTES + cfg.vocab_size * cfg.n_embd * (4 + e)


def token_bytes(cfg: ModelConfig, *, lm_loss: bool, grad_checkpointing: bool, amp: bool = True,
                backend: str = "fused", dropout: float = 0.0) -> float:
    """Bytes per token of one training forward and backward at their peak: the saved activations
    and, with the language-model loss, its per-token temporaries. With activation checkpointing
    only each block's fp32 input is kept, and one recomputed block and the loss's temporaries are
    never alive at the same time."""
    layer, top = activation_bytes(cfg, lm_loss=lm_loss, amp=amp, backend=backend, dropout=dropout)
    loss = loss_bytes(cfg, amp, backend)[0] if lm_loss else 0.0
    if grad_checkpointing:
        return cfg.n_layer * 4 * cfg.n_embd + top + max(layer, loss)
    return cfg.n_layer * layer + top + loss


# ------------------------------------------------------------------------------- plans
@dataclass
class MemoryPlan:
    """Bytes a stage holds; ``total(n)`` at its peak with a micro-batch of n rows of ``seq_len``.

    ``static`` is held across steps (fp32 weights and AdamW state, frozen models). Within a step
    the peak is the larger of two moments measured on an H100: the end of the forward pass
    (bf16 weight copies, every row's activations, the loss workspace) and the optimizer step
    (the fp32 gradients, which backward allocates as it frees the activations).
    """

    model: str
    stage: str
    params: int
    seq_len: int
    budget: float
    static: dict[str, float] = field(default_factory=dict)      # held across steps
    gradients: float = 0.0                                      # fp32 gradients of the trained models
    weight_copies: float = 0.0                                  # bf16 copies autocast makes in a step
    per_row: dict[str, float] = field(default_factory=dict)     # per micro-batch row
    workspace: float = 0.0                                      # the loss's, once per step
    rollout_per_row: float = 0.0                                # PPO: KV cache per rollout row
    generation_copy: float = 0.0                                # PPO under FSDP: the whole policy, bf16
    fsdp: int = 0                                               # GPUs the trained models are sharded over

    def total(self, rows: int) -> float:
        forward = self.weight_copies + rows * sum(self.per_row.values()) + self.workspace
        return sum(self.static.values()) + max(self.gradients, forward)

    @property
    def max_rows(self) -> int:
        """Largest micro-batch (rows of seq_len tokens) that fits, 0 if none does."""
        room = self.budget - sum(self.static.values())
        per = sum(self.per_row.values())
        if per <= 0 or room < self.gradients:
            return 0
        return max(0, int((room - self.weight_copies - self.workspace) // per))

    @property
    def max_rollout_rows(self) -> int:
        room = self.budget - sum(self.static.values()) - self.generation_copy
        return max(0, int(room // self.rollout_per_row)) if self.rollout_per_row else 0


def plan(cfg: ModelConfig, stage: str, *, seq_len: int = 2048, budget: float = 80 * GB, model_name: str = "",
         amp: bool = True, backend: str = "fused", grad_checkpointing: bool = False,
         value_model: str = "reward", dropout: float | None = None, fsdp: int = 0) -> MemoryPlan:
    """Memory of ``stage`` for a model of config ``cfg`` at ``seq_len`` tokens per row (PPO: the
    prompt and the answer) on one GPU, or on one of ``fsdp`` GPUs sharding the trained models;
    ``dropout`` defaults to the stage's (SFT 0.1, PPO none)."""
    if stage not in STAGES:
        raise PlanError(f"--stage {stage}: expected one of {', '.join(STAGES)}")
    if seq_len < 1:
        raise PlanError(f"--seq-len {seq_len}: expected a positive number of tokens")
    n = num_params(cfg)
    # A scalar-head model never uses an untied lm_head: no gradient, no AdamW state, no bf16 copy.
    used = n - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd)
    p = MemoryPlan(model_name or "model", stage, n, seq_len, budget)
    if dropout is None:
        dropout = {"pretrain": cfg.dropout, "sft": 0.1}.get(stage, 0.0)
    act = dict(amp=amp, backend=backend, grad_checkpointing=grad_checkpointing, dropout=dropout)
    copy = 2.0 if amp else 0.0
    trained = {"pretrain": [n], "sft": [n], "reward": [used], "ppo": [n] + ([used] if value_model == "reward" else [])}
    p.static["fp32 weights and AdamW state"] = 12.0 * sum(trained[stage]) + 4.0 * (n * len(trained[stage])
                                                                                   - sum(trained[stage]))
    p.gradients = 4.0 * sum(trained[stage])
    p.weight_copies = copy * sum(trained[stage])
    if fsdp > 1:
        root, blocks = param_split(cfg)
        whole = len(trained[stage]) * (root + 2 * blocks / cfg.n_layer)  # what is unsharded at a time
        p.fsdp = fsdp
        p.static["fp32 weights and AdamW state"] /= fsdp
        p.gradients = p.gradients / fsdp + 4.0 * whole
        p.weight_copies = (copy or 4.0) * whole
        if stage == "ppo":
            p.generation_copy = (2.0 if amp else 4.0) * n
    if stage in ("pretrain", "sft"):
        p.per_row["activations"] = token_bytes(cfg, lm_loss=True, **act) * seq_len
        p.workspace = loss_bytes(cfg, amp, backend)[1]
    elif stage == "reward":
        p.per_row["activations"] = token_bytes(cfg, lm_loss=False, **act) * seq_len
    else:  # ppo: the policy (and a value model) train; the SFT reference and reward model are frozen
        value = token_bytes(cfg, lm_loss=False, **act) if value_model == "reward" else 0.0
        p.static["frozen reference and reward model (bf16)"] = (2.0 if amp else 4.0) * 2 * n
        p.per_row["activations (policy and value)"] = (token_bytes(cfg, lm_loss=True, **act) + value) * seq_len
        p.workspace = loss_bytes(cfg, amp, backend)[1]
        p.rollout_per_row = cfg.n_layer * 2 * cfg.kv_heads * cfg.head_dim * (2 if amp else 4) * seq_len
    return p


# ---------------------------------------------------------------------------- report
def _gb(x: float) -> str:
    return f"{x / GB:,.2f} GB"


def format_plan(p: MemoryPlan, cfg: ModelConfig) -> str:
    lines = [f"{p.model}: {p.params / 1e6:,.1f}M parameters ({cfg.n_layer} layers x {cfg.n_embd}, "
             f"{cfg.n_head}/{cfg.kv_heads} query/key-value heads, vocabulary {cfg.vocab_size:,}); stage {p.stage}, "
             f"rows of {p.seq_len:,} tokens, budget {_gb(p.budget)}"
             + (f" on each of {p.fsdp} GPUs sharding the trained models (fsdp)" if p.fsdp else "")]
    for name, value in p.static.items():
        lines.append(f"  {name:<42} {_gb(value):>12}")
    lines.append(f"  {'fp32 gradients (from backward to the step)':<42} {_gb(p.gradients):>12}")
    if p.weight_copies:
        lines.append(f"  {'bf16 weight copies (forward, backward)':<42} {_gb(p.weight_copies):>12}")
    for name, value in p.per_row.items():
        if value:
            lines.append(f"  {name + ' per row':<42} {_gb(value):>12}")
    lines.append(f"  {'loss workspace':<42} {_gb(p.workspace):>12}")
    if p.rollout_per_row:
        lines.append(f"  {'KV cache per rollout row':<42} {_gb(p.rollout_per_row):>12}")
    if p.generation_copy:
        lines.append(f"  {'whole policy for generation (bf16)':<42} {_gb(p.generation_copy):>12}")
    rows = p.max_rows
    if rows:
        lines.append(f"largest micro-batch: {rows} rows ({rows * p.seq_len:,} tokens), {_gb(p.total(rows))}")
    else:
        lines.append(f"does not fit: one row needs {_gb(p.total(1))}")
    if p.rollout_per_row:
        lines.append(f"largest rollout batch: {p.max_rollout_rows} rows" + (" per GPU" if p.fsdp else ""))
    return "\n".join(lines)
