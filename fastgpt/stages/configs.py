"""The settings of every training stage, one dataclass per stage on top of :class:`TrainConfig`.

They live apart from the stage modules so that reading them needs no torch: the command line
builds each stage's flags and ``--help`` from these classes before anything heavy is imported.
Each stage module re-exports its own (``fastgpt.stages.sft.SFTConfig`` is this ``SFTConfig``).

A stage reads only the data its config names. An empty data field is an error there; the
command line fills it with the built-in world first (``fastgpt.demo.builtin``), in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

from ..config import (Fraction, ModelConfig, NonNegative, NonNegativeFloat, Positive, PositiveFloat, Range, Ratio,
                      TrainConfig)


@dataclass
class LoRAConfig:
    """LoRA settings every training stage takes (:mod:`fastgpt.lora`): with ``lora_rank`` > 0 only
    low-rank adapters train, and the reference of PPO, DPO and GRPO is the same weights with the
    adapters off. Checkpoints hold the merged weights (they load as plain models)."""

    lora_rank: NonNegative = 0              # 0 = full fine-tuning; r >= 1: rank-r adapters only
    lora_alpha: PositiveFloat = 16.0        # adapter output scale is lora_alpha / lora_rank
    lora_targets: str = "qkv,proj,up,down"  # comma-separated layers that get adapters, of qkv,proj,up,down (not the lm_head)


@dataclass
class PretrainConfig(LoRAConfig, TrainConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: str = ""              # dataset folder from `fastgpt prepare` (command line: the built-in corpus if empty)
    # a fastgpt checkpoint or "hf:<folder>" (a Hugging Face model) brings its own model settings, of
    # which model.block_size (up to its context) and model.dropout may change
    init_from: str = ""         # "" = a new model; or a fastgpt checkpoint or hf:<folder> to start from
    batch_size: NonNegative = 0  # rows per micro-batch; 0 = the largest `fastgpt plan` fits (at most 16)
    eval_batches: Positive = 20  # validation batches per evaluation (the same windows every time)
    builtin_documents: Positive = 30000  # size of the built-in corpus the command line generates when data = ""

    RESUME_SAFE: ClassVar[frozenset[str]] = TrainConfig.RESUME_SAFE | {"eval_batches"}


@dataclass
class SFTConfig(LoRAConfig, TrainConfig):
    # The architecture comes from init_from, so there is no nested ModelConfig to set here.
    out_dir: str = "runs/sft"
    init_from: str = ""            # required: a fastgpt checkpoint or "hf:<Hugging Face model folder>"
    tokenizer: str = ""            # for an hf: start only: a tokenizer ("" = the folder's, with its chat template)
    block_size: NonNegative = 0    # context (rows) to train at, up to the model's; 0 = the model's
    batch_size: NonNegative = 0    # rows per micro-batch; 0 = the largest `fastgpt plan` fits (at most 16)
    data: str = ""                 # conversations JSONL (command line: the built-in demonstrations if empty)
    val_fraction: Fraction = 0.05  # conversations held out for val_loss
    epochs: NonNegativeFloat = 0.0  # > 0: sets max_steps to this many passes over the data
    dropout: Fraction = 0.1        # residual/embedding dropout while fine-tuning (not saved with the model)
    max_bad_fraction: Ratio = 0.1  # more bad records than this share fails the run
    eval_format_prompts: NonNegative = 8  # held-out prompts answered greedily for format_rate (0: off)
    eval_max_new_tokens: Positive = 64  # longest answer generated for format_rate
    lr: PositiveFloat = 3e-4
    warmup_steps: NonNegative = 20
    max_steps: Positive = 500
    eval_interval: NonNegative = 100

    RESUME_SAFE: ClassVar[frozenset[str]] = TrainConfig.RESUME_SAFE | {
        "epochs", "eval_format_prompts", "eval_max_new_tokens"}


@dataclass
class RewardConfig(LoRAConfig, TrainConfig):
    # The architecture comes from init_from, so there is no nested ModelConfig to set here.
    out_dir: str = "runs/reward"
    init_from: str = ""            # required: the SFT checkpoint (any language-model checkpoint, or hf:<folder>)
    block_size: NonNegative = 0    # context to train at, up to the model's; 0 = the model's
    batch_size: NonNegative = 0    # rows per micro-batch; 0 = the largest `fastgpt plan` fits (at most 16)
    data: str = ""                 # rankings (fastgpt rank) or {"prompt", "chosen", "rejected"} pairs, JSONL
    val_fraction: Fraction = 0.1   # prompts held out for pairwise accuracy
    epochs: NonNegativeFloat = 1.0  # InstructGPT: one epoch (more overfits); > 0 sets max_steps
    min_steps: NonNegative = 50    # with epochs: train at least this many steps (a small file is a few steps an epoch)
    max_bad_fraction: Ratio = 0.1  # more bad records than this share fails the run
    lr: PositiveFloat = 1e-4
    warmup_steps: NonNegative = 10
    eval_interval: NonNegative = 50
    likelihood_from: str = ""      # a frozen LM checkpoint (e.g. the base model) whose log-probs of each response join the score, weights fitted on held-out pairs; "" = off

    RESUME_SAFE: ClassVar[frozenset[str]] = TrainConfig.RESUME_SAFE | {"epochs", "min_steps"}


@dataclass
class OnPolicyConfig(TrainConfig):
    """Trainer defaults that suit on-policy RL (InstructGPT / lm-human-preferences): PPO's and GRPO's."""

    max_steps: Positive = 200
    lr: PositiveFloat = 1e-5
    warmup_steps: NonNegative = 0
    min_lr_ratio: Ratio = 1.0         # constant learning rate
    weight_decay: NonNegativeFloat = 0.0
    adam_eps: PositiveFloat = 1e-5
    eval_interval: NonNegative = 0
    log_interval: Positive = 1
    ckpt_interval: Positive = 50

    PER_PROCESS: ClassVar[frozenset[str]] = TrainConfig.PER_PROCESS | {"rollout_batch_size"}


@dataclass
class RewardGuardConfig:
    """Guards against over-optimising a learned reward, which the on-policy stages (PPO, GRPO)
    share: a reward-model ensemble, a length penalty, drift warnings, and how best.pt is chosen
    (:mod:`fastgpt.stages.policy_eval`)."""

    reward_ensemble: str = ""         # more reward checkpoints, comma-separated, scored with reward_checkpoint
    ensemble_mode: Literal["mean", "min", "lcb"] = "mean"  # how ensemble scores combine (lcb = mean - std)
    length_penalty: NonNegativeFloat = 0.0  # score -= length_penalty * |tokens - length_target| / length_target
    length_target: NonNegativeFloat = 0.0  # tokens; 0 = the first rollout's mean response length (the SFT policy's)
    # warnings when the policy drifts (0 = off), and which evaluation is kept as best.pt
    warn_kl: NonNegativeFloat = 0.0   # warn when a rollout's KL to the reference passes this (nats / response)
    warn_length_ratio: NonNegativeFloat = 0.0  # warn when mean length leaves [first / r, first * r] of the first rollout's
    best_max_kl: NonNegativeFloat = 0.0  # no gold judge: best.pt is the best greedy RM score with KL <= this (0: any)

    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset({"warn_kl", "warn_length_ratio"})  # warnings only


@dataclass
class PretrainMixConfig:
    """PPO-ptx (InstructGPT, section 3.5): the on-policy stages (PPO, GRPO) can add the
    pre-training loss on a batch of pre-training text to every step, which keeps what the
    pre-trained model knew while the policy follows a learned reward."""

    ptx_data: str = ""                # dataset folder (`fastgpt prepare`) mixed in; "" = none
    ptx_coef: NonNegativeFloat = 0.0  # weight of the pre-training loss (PPO-ptx's gamma)
    ptx_batch_size: Positive = 4      # pre-training rows per step


@dataclass
class PPOConfig(LoRAConfig, RewardGuardConfig, PretrainMixConfig, OnPolicyConfig):
    out_dir: str = "runs/ppo"
    sft_checkpoint: str = ""          # required: the policy's start and its frozen KL reference (or hf:<folder>)
    reward_checkpoint: str = ""       # required: the frozen reward model (fastgpt reward)
    prompts: str = ""                 # JSONL of {"prompt"} or {"messages"} (command line: the built-in world's)
    eval_prompts: str = ""            # held-out prompts for the summary ("" = hold out eval_fraction of prompts)
    eval_fraction: Fraction = 0.1     # share of prompts held out (not trained on) when eval_prompts is ""
    world_seed: int = 0               # seed of the built-in world (match the SFT/RM data)
    eval_max_prompts: NonNegative = 64  # held-out prompts scored for the summary, at most
    # rollout
    rollout_batch_size: Positive = 64  # prompts answered per rollout (per process under torchrun)
    generation_batch_size: NonNegative = 0  # prompts sampled at once, each batch with its own seed; 0 = all
    mini_batch_size: Positive = 16    # sequences per trainer step (x grad_accum, per process)
    ppo_epochs: Positive = 4          # passes over each rollout's minibatches
    max_new_tokens: Positive = 64     # longest sampled response
    temperature: PositiveFloat = 1.0  # sampling temperature of rollouts (log-probs use the same)
    # reward shaping
    beta: NonNegativeFloat = 0.05     # KL penalty coefficient (initial value if adaptive)
    adaptive_kl: bool = False         # adapt beta towards target_kl
    target_kl: PositiveFloat = 6.0    # adaptive controller's per-sequence KL target (nats)
    kl_horizon: Positive = 10000      # adaptive controller's horizon (sequences)
    kl_estimator: Literal["k1", "k3"] = "k1"  # per-token KL estimate: k1 = log ratio, k3 = unbiased, >= 0
    reward_clip: NonNegativeFloat = 0.0  # clip normalised scores to +-this; 0 = off
    missing_eos_penalty: float = -1.0  # score of a response that never ended its turn; 0 = off
    whiten_rewards: bool = False      # whiten per-token rewards within each rollout
    # PPO
    gamma: Ratio = 1.0                # discount in GAE
    lam: Ratio = 0.95                 # GAE lambda
    clip_range: PositiveFloat = 0.2   # policy ratio clip
    clip_range_value: PositiveFloat = 0.2  # value prediction clip
    vf_coef: NonNegativeFloat = 0.1   # weight of the value loss
    ent_coef: float = 0.0             # weight of the entropy bonus
    early_stop_kl: NonNegativeFloat = 0.0  # drop the rest of the buffer when approx KL exceeds it; 0 = off
    whiten_advantages: bool = True    # whiten advantages within each rollout
    # models
    value_model: Literal["reward", "head"] = "reward"  # reward: a copy of the reward model; head: on the policy
    value_head_zero: bool = False     # start the value head at zero
    max_bad_rollouts: NonNegative = 3  # rollouts with non-finite rewards tolerated before stopping

    RESUME_SAFE: ClassVar[frozenset[str]] = (TrainConfig.RESUME_SAFE | RewardGuardConfig.RESUME_SAFE
                                             | {"eval_max_prompts", "max_bad_rollouts"})


@dataclass
class DPOConfig(LoRAConfig, TrainConfig):
    """Direct preference optimisation (Rafailov et al. 2023) and its relatives on the reward
    stage's data: chosen/rejected pairs or K-wise rankings (all C(K, 2) pairs of a prompt)."""

    out_dir: str = "runs/dpo"
    init_from: str = ""            # required: the SFT checkpoint, the policy's start and its reference (or hf:<folder>)
    block_size: NonNegative = 0    # context to train at, up to the model's; 0 = the model's
    data: str = ""                 # rankings (fastgpt rank) or {"prompt", "chosen", "rejected"} pairs, JSONL
    val_fraction: Fraction = 0.1   # prompts held out for the pairwise reward accuracy
    epochs: NonNegativeFloat = 1.0  # > 0 sets max_steps to this many passes over the data
    min_steps: NonNegative = 50    # with epochs: train at least this many steps (a small file is a few steps an epoch)
    max_bad_fraction: Ratio = 0.1  # more bad records than this share fails the run
    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid: DPO; ipo: squared loss towards a margin of 1/(2 beta)
    beta: PositiveFloat = 0.1      # strength of the implicit KL constraint to the reference
    label_smoothing: Annotated[float, Range(0, 0.5, high_open=True)] = 0.0  # conservative DPO: share of labels assumed flipped (sigmoid only)
    precompute_ref: bool = True    # reference log-probs once before training (else every step, no grad)
    lr: PositiveFloat = 1e-6       # the DPO paper's; LoRA runs usually take 10-100x more
    warmup_steps: NonNegative = 10
    min_lr_ratio: Ratio = 1.0      # constant after warmup, as in the DPO paper
    weight_decay: NonNegativeFloat = 0.0
    eval_interval: NonNegative = 50

    RESUME_SAFE: ClassVar[frozenset[str]] = TrainConfig.RESUME_SAFE | {"epochs", "min_steps", "precompute_ref"}


@dataclass
class GRPOConfig(LoRAConfig, RewardGuardConfig, PretrainMixConfig, OnPolicyConfig):
    """Group-relative policy optimisation (Shao et al. 2024) and RLOO (Ahmadian et al. 2024):
    K samples per prompt, the group's other samples as the baseline, no value model."""

    out_dir: str = "runs/grpo"
    sft_checkpoint: str = ""          # required: the policy's start and its frozen KL reference (or hf:<folder>)
    reward_checkpoint: str = ""       # required: the frozen reward model (fastgpt reward; Python: or a reward_fn)
    prompts: str = ""                 # JSONL of {"prompt"} or {"messages"} (command line: the built-in world's)
    eval_prompts: str = ""            # held-out prompts for the summary ("" = hold out eval_fraction of prompts)
    eval_fraction: Fraction = 0.1     # share of prompts held out (not trained on) when eval_prompts is ""
    world_seed: int = 0               # seed of the built-in world (match the SFT/RM data)
    eval_max_prompts: NonNegative = 64  # held-out prompts scored for the summary, at most
    # rollout
    group_size: Annotated[int, Range(2)] = 4  # K samples per prompt (the group is the baseline)
    rollout_batch_size: Positive = 64  # sequences per rollout, a multiple of group_size (per process under torchrun)
    generation_batch_size: NonNegative = 0  # sequences sampled at once (whole groups), each batch with its own seed; 0 = all
    mini_batch_size: Positive = 16    # sequences per trainer step (x grad_accum, per process)
    ppo_epochs: Positive = 1          # passes over each rollout (1: the GRPO paper's mu = 1)
    max_new_tokens: Positive = 64     # longest sampled response
    temperature: PositiveFloat = 1.0  # sampling temperature of rollouts (log-probs use the same)
    # objective
    advantage: Literal["grpo", "rloo"] = "grpo"  # grpo: (r - group mean) / group std; rloo: r - mean of the other K-1
    loss_level: Literal["token", "sequence"] = "token"  # token: mean over all tokens; sequence: per response first
    clip_range: PositiveFloat = 0.2   # policy ratio clip
    beta: NonNegativeFloat = 0.04     # weight of the KL(policy || reference) term in the loss; 0 = off
    kl_estimator: Literal["k1", "k3"] = "k3"  # per-token KL in the loss: k1 = log ratio, k3 = unbiased, >= 0 (GRPO's)
    reward_clip: NonNegativeFloat = 0.0  # clip scores to +-this before the group statistics; 0 = off
    missing_eos_penalty: float = -1.0  # score of a response that never ended its turn; 0 = off
    max_bad_rollouts: NonNegative = 3  # rollouts with non-finite rewards tolerated before stopping

    RESUME_SAFE: ClassVar[frozenset[str]] = (TrainConfig.RESUME_SAFE | RewardGuardConfig.RESUME_SAFE
                                             | {"eval_max_prompts", "max_bad_rollouts"})
