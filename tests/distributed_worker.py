"""Runs stage jobs in one process of a torchrun launch (tests/test_distributed.py).

``python -m torch.distributed.run --nproc_per_node N tests/distributed_worker.py JOBS.json``: every
process runs the jobs (``[{"stage": ..., "config": {...dotted overrides}}]``) in order, the way
``fastgpt <stage>`` would, sharing one process group.
"""
from __future__ import annotations

import json
import sys
from typing import Any


def run_stage(stage: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """One stage run from dotted config overrides; returns the trainer's summary."""
    from fastgpt.config import build_config
    if stage == "pretrain":
        from fastgpt.stages.pretrain import PretrainConfig, pretrain
        return pretrain(build_config(PretrainConfig, overrides=overrides))
    if stage == "sft":
        from fastgpt.stages.sft import SFTConfig, sft
        return sft(build_config(SFTConfig, overrides=overrides))
    if stage == "reward":
        from fastgpt.stages.reward import RewardConfig, train_reward
        return train_reward(build_config(RewardConfig, overrides=overrides))
    if stage == "grpo":
        from fastgpt.stages.grpo import GRPOConfig, grpo
        return grpo(build_config(GRPOConfig, overrides=overrides))
    if stage == "dpo":
        from fastgpt.stages.dpo import DPOConfig, dpo
        return dpo(build_config(DPOConfig, overrides=overrides))
    from fastgpt.stages.ppo import PPOConfig, ppo
    return ppo(build_config(PPOConfig, overrides=overrides))


def main(path: str) -> None:
    import torch.distributed as dist
    for job in json.loads(open(path).read()):
        run_stage(job["stage"], job["config"])
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
