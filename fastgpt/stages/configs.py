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
class PretrainConfig(TrainConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: str = ""              # dataset folder from `fastgpt prepare` (command line: the built-in corpus if empty)
    # "" = random init; a fastgpt checkpoint or "hf:<folder>" (a Hugging Face model): the model's own
    # settings, of which model.block_size (up to its context) and model.dropout may change
    init_from: str = ""
    batch_size: int = 0         # rows per micro-batch; 0 = the largest `fastgpt plan` fits (at most 16)
    eval_batches: int = 20      # validation batches per evaluation (same windows every time)
    builtin_documents: int = 30000  # size of the built-in corpus the command line generates when data = ""


@dataclass
class SFTConfig(TrainConfig):
    # The architecture comes from init_from, so there is no nested ModelConfig to set here.
    out_dir: str = "runs/sft"
    init_from: str = ""            # required: a fastgpt checkpoint or "hf:<Hugging Face model folder>"
    tokenizer: str = ""            # for hf: init only ("" = the folder's tokenizer and chat template)
    block_size: int = 0            # context (rows) to train at, up to the model's; 0 = the model's
    batch_size: int = 0            # rows per micro-batch; 0 = the largest `fastgpt plan` fits (at most 16)
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
class RewardConfig(TrainConfig):
    # The architecture comes from init_from, so there is no nested ModelConfig to set here.
    out_dir: str = "runs/reward"
    init_from: str = ""            # required: the SFT checkpoint (any language-model checkpoint, or hf:<folder>)
    block_size: int = 0            # context to train at, up to the model's; 0 = the model's
    batch_size: int = 0            # rows per micro-batch; 0 = the largest `fastgpt plan` fits (at most 16)
    data: str = ""                 # rankings or chosen/rejected pairs, JSONL
    val_fraction: float = 0.1      # prompts held out for pairwise accuracy
    epochs: float = 1.0            # InstructGPT: one epoch (more overfits); > 0 sets max_steps
    max_bad_fraction: float = 0.1
    lr: float = 1e-4
    warmup_steps: int = 10
    eval_interval: int = 50


@dataclass
class PPOConfig(TrainConfig):
    out_dir: str = "runs/ppo"
    sft_checkpoint: str = ""          # policy init and frozen reference (a checkpoint or hf:<folder>)
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
    missing_eos_penalty: float = -1.0  # score of a response that never ended its turn; 0 = off
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
