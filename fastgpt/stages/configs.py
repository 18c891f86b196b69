"""The settings of every training stage, one dataclass per stage on top of :class:`TrainConfig`.

They live apart from the stage modules so that reading them needs no torch: the command line
builds each stage's flags and ``--help`` from these classes before anything heavy is imported.
Each stage module re-exports its own (``fastgpt.stages.sft.SFTConfig`` is this ``SFTConfig``).

A stage reads only the data its config names. An empty data field is an error there; the
command line fills it with the built-in world first (``fastgpt.demo.builtin``), in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ModelConfig, TrainConfig


@dataclass
class LoRAConfig:
    """LoRA settings every training stage takes (:mod:`fastgpt.lora`): with ``lora_rank`` > 0 only
    low-rank adapters train, and the reference of PPO, DPO and GRPO is the same weights with the
    adapters off. Checkpoints hold the merged weights (they load as plain models)."""

    lora_rank: int = 0                      # 0 = full fine-tuning; r >= 1: rank-r adapters only
    lora_alpha: float = 16.0                # adapter output scale is lora_alpha / lora_rank
    lora_targets: str = "qkv,proj,up,down"  # linear layers that get adapters (attention, MLP)


@dataclass
class PretrainConfig(LoRAConfig, TrainConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: str = ""              # dataset folder from `fastgpt prepare` (command line: the built-in corpus if empty)
    init_from: str = ""         # "" = random init; a fastgpt checkpoint; "hf:<folder>" = GPT-2 import
    eval_batches: int = 20      # validation batches per evaluation (same windows every time)
    builtin_documents: int = 30000  # size of the built-in corpus the command line generates when data = ""


@dataclass
class SFTConfig(LoRAConfig, TrainConfig):
    # The architecture comes from init_from, so there is no nested ModelConfig to set here.
    out_dir: str = "runs/sft"
    init_from: str = ""            # required: a fastgpt checkpoint or "hf:<GPT-2 folder>"
    tokenizer: str = ""            # for hf: init only ("" = the folder's tokenizer.json)
    data: str = ""                 # conversations JSONL (command line: the built-in demonstrations if empty)
    val_fraction: float = 0.05     # conversations held out for val_loss
    epochs: float = 0.0            # > 0: sets max_steps to this many passes over the data
    dropout: float = 0.1           # residual/embedding dropout while fine-tuning (not saved)
    max_bad_fraction: float = 0.1  # more bad records than this fails the run
    eval_format_prompts: int = 8   # val prompts answered greedily for format_rate (0: off)
    eval_max_new_tokens: int = 64
    lr: float = 3e-4
    warmup_steps: int = 20
    max_steps: int = 500
    eval_interval: int = 100


@dataclass
class RewardConfig(LoRAConfig, TrainConfig):
    # The architecture comes from init_from, so there is no nested ModelConfig to set here.
    out_dir: str = "runs/reward"
    init_from: str = ""            # required: the SFT checkpoint (any language-model checkpoint)
    data: str = ""                 # rankings or chosen/rejected pairs, JSONL
    val_fraction: float = 0.1      # prompts held out for pairwise accuracy
    epochs: float = 1.0            # InstructGPT: one epoch (more overfits); > 0 sets max_steps
    max_bad_fraction: float = 0.1
    lr: float = 1e-4
    warmup_steps: int = 10
    eval_interval: int = 50


@dataclass
class PPOConfig(LoRAConfig, TrainConfig):
    out_dir: str = "runs/ppo"
    sft_checkpoint: str = ""          # policy init and frozen reference
    reward_checkpoint: str = ""       # frozen reward model (scalar checkpoint)
    prompts: str = ""                 # JSONL of {"prompt"} or {"messages"} (command line: the built-in world's)
    eval_prompts: str = ""            # held-out prompts for the summary (command line: the built-in world's)
    world_seed: int = 0               # seed of the built-in world (match the SFT/RM data)
    eval_max_prompts: int = 64
    # rollout
    rollout_batch_size: int = 64
    mini_batch_size: int = 16         # sequences per trainer step (x grad_accum)
    ppo_epochs: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    # reward shaping
    beta: float = 0.05                # KL penalty coefficient (initial value if adaptive)
    adaptive_kl: bool = False
    target_kl: float = 6.0            # adaptive controller's per-sequence KL target (nats)
    kl_horizon: int = 10000
    kl_estimator: str = "k1"          # "k1" | "k3"
    reward_clip: float = 0.0          # clip normalised scores to +-this; 0 = off
    missing_eos_penalty: float = -1.0  # score of a response that never emitted <|end|>; 0 = off
    whiten_rewards: bool = False
    # PPO
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    early_stop_kl: float = 0.0        # drop the rest of the buffer when approx KL exceeds it; 0 = off
    whiten_advantages: bool = True
    # models
    value_model: str = "reward"       # "reward": a copy of the reward model; "head": head on the policy
    value_head_zero: bool = False     # start the value head at zero
    # PPO-ptx
    ptx_data: str = ""                # dataset folder (`fastgpt prepare`); "" = no pretraining mix
    ptx_coef: float = 0.0
    ptx_batch_size: int = 4
    max_bad_rollouts: int = 3         # rollouts with non-finite rewards tolerated before stopping
    # trainer defaults that suit PPO (InstructGPT/lm-human-preferences)
    max_steps: int = 200
    lr: float = 1e-5
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0         # constant learning rate
    weight_decay: float = 0.0
    adam_eps: float = 1e-5
    eval_interval: int = 0
    log_interval: int = 1
    ckpt_interval: int = 50


@dataclass
class DPOConfig(LoRAConfig, TrainConfig):
    """Direct preference optimisation (Rafailov et al. 2023) and its relatives on the reward
    stage's data: chosen/rejected pairs or K-wise rankings (all C(K, 2) pairs of a prompt)."""

    out_dir: str = "runs/dpo"
    init_from: str = ""            # required: the SFT checkpoint (the policy's start and its reference)
    data: str = ""                 # rankings (fastgpt rank) or {"prompt", "chosen", "rejected"} pairs, JSONL
    val_fraction: float = 0.1      # prompts held out for the pairwise reward accuracy
    epochs: float = 1.0            # > 0 sets max_steps to this many passes over the data
    max_bad_fraction: float = 0.1
    loss: str = "sigmoid"          # "sigmoid" (DPO) | "ipo" (IPO: squared loss towards a margin of 1/(2 beta))
    beta: float = 0.1              # strength of the implicit KL constraint to the reference
    label_smoothing: float = 0.0   # conservative DPO: the share of pairs assumed mislabelled (sigmoid only)
    precompute_ref: bool = True    # reference log-probs once before training (else every step, no grad)
    lr: float = 1e-6               # the DPO paper's; LoRA runs usually take 10-100x more
    warmup_steps: int = 10
    min_lr_ratio: float = 1.0      # constant after warmup, as in the DPO paper
    weight_decay: float = 0.0
    eval_interval: int = 50


@dataclass
class GRPOConfig(LoRAConfig, TrainConfig):
    """Group-relative policy optimisation (Shao et al. 2024) and RLOO (Ahmadian et al. 2024):
    K samples per prompt, the group's other samples as the baseline, no value model."""

    out_dir: str = "runs/grpo"
    sft_checkpoint: str = ""          # required: the policy's start and its frozen KL reference
    reward_checkpoint: str = ""       # the frozen reward model (Python API: or a reward function)
    prompts: str = ""                 # JSONL of {"prompt"} or {"messages"} (command line: the built-in world's)
    eval_prompts: str = ""            # held-out prompts for the summary (command line: the built-in world's)
    world_seed: int = 0               # seed of the built-in world (match the SFT/RM data)
    eval_max_prompts: int = 64
    # rollout
    group_size: int = 4               # K samples per prompt
    rollout_batch_size: int = 64      # sequences per rollout (a multiple of group_size)
    mini_batch_size: int = 16         # sequences per trainer step (x grad_accum)
    ppo_epochs: int = 1               # passes over each rollout (1: the GRPO paper's mu = 1)
    max_new_tokens: int = 64
    temperature: float = 1.0
    # objective
    advantage: str = "grpo"           # "grpo": (r - group mean) / group std; "rloo": r - mean of the other K-1
    loss_level: str = "token"         # "token": mean over all tokens; "sequence": mean per response, then over responses
    clip_range: float = 0.2
    beta: float = 0.04                # weight of the KL(policy || reference) term in the loss; 0 = off
    kl_estimator: str = "k3"          # "k1" | "k3" (the GRPO paper's: unbiased and >= 0)
    reward_clip: float = 0.0          # clip scores to +-this before the group statistics; 0 = off
    missing_eos_penalty: float = -1.0  # score of a response that never emitted <|end|>; 0 = off
    max_bad_rollouts: int = 3         # rollouts with non-finite rewards tolerated before stopping
    # trainer defaults that suit on-policy RL (as PPO's)
    max_steps: int = 200
    lr: float = 1e-5
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0
    weight_decay: float = 0.0
    adam_eps: float = 1e-5
    eval_interval: int = 0
    log_interval: int = 1
    ckpt_interval: int = 50
