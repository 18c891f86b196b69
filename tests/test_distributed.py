"""Every stage (pretrain, SFT, reward, PPO, DPO, GRPO) under torchrun on the CPU (gloo, 2 processes):
DDP and FSDP runs train on the same global batches as one process with twice the grad_accum
(PPO, GRPO: twice the rollout) and follow its loss curve to fp32 rounding, a DDP run resumed on 2
processes too; checkpoints resume on another number of processes (sharded 2 -> 1 plain and
1 -> 2 sharded, plain 1 -> 2 sharded, DDP 2 -> 1), continuing that curve.

One torchrun launch runs all 2-process jobs (tests/distributed_worker.py); the 1-process runs
happen in this process. Tiny models and 4 steps keep it to about a minute on 2 cores.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from distributed_worker import run_stage
from fastgpt.checkpoint import load_checkpoint, save_checkpoint
from fastgpt.config import ModelConfig
from fastgpt.model import GPT, ScalarModel
from helpers import TINY, TOK, write_jsonl

STAGES = ("pretrain", "sft", "reward", "ppo", "dpo", "grpo")
STEPS = 4
HALF = 2
TESTS = Path(__file__).resolve().parent


def stage_configs(root: Path, data: Path) -> dict[str, dict[str, Any]]:
    """Each stage's settings, the same under any number of processes (all on the CPU, fp32)."""
    # untied output layers: a scalar model never uses its lm_head, which DDP must be told
    untied = ModelConfig(**TINY, tie_embeddings=False)
    torch.manual_seed(0)
    sft_ckpt = str(save_checkpoint(root / "sft-start", model=GPT(untied), model_kind="gpt", model_config=untied,
                                   tokenizer=TOK, stage="sft").parent)
    rm = ScalarModel(untied)
    save_checkpoint(root / "rm", model=rm, model_kind="scalar", model_config=rm.config, tokenizer=TOK,
                    stage="reward", extra={"reward_offset": 0.1, "reward_scale": 2.0})
    convos = write_jsonl(root / "convos.jsonl", ({"messages": [
        {"role": "user", "content": f"question {i}?" + " more" * (i % 4)},
        {"role": "assistant", "content": f"answer {i}." + " yes" * (i % 3)}]} for i in range(24)))
    rankings = write_jsonl(root / "rankings.jsonl", ({
        "prompt": f"say {i}", "responses": [f"{i} ok", "no" * (1 + i % 3), f"well {i}"],
        "ranking": [0, 2, 1]} for i in range(20)))
    prompts = write_jsonl(root / "prompts.jsonl", ({"prompt": f"letter {i}?"} for i in range(12)))
    common = {"device": "cpu", "progress": False, "log_interval": 1, "eval_interval": 0, "warmup_steps": 1,
              "lr": 1e-3, "max_steps": STEPS, "seed": 3}
    return {
        "pretrain": {**common, "data": str(data), "model.block_size": 32, "model.n_layer": 2, "model.n_head": 2,
                     "model.n_embd": 32, "batch_size": 2, "eval_batches": 1},
        "sft": {**common, "init_from": sft_ckpt, "data": convos, "batch_size": 1, "dropout": 0.0,
                "eval_format_prompts": 1, "eval_max_new_tokens": 2},
        "reward": {**common, "init_from": sft_ckpt, "data": rankings, "batch_size": 2, "epochs": 0.0},
        "dpo": {**common, "init_from": sft_ckpt, "data": rankings, "batch_size": 2, "epochs": 0.0},
        "grpo": {**common, "sft_checkpoint": sft_ckpt, "reward_checkpoint": str(root / "rm"), "prompts": prompts,
                 "eval_max_prompts": 2, "group_size": 2, "mini_batch_size": 2, "generation_batch_size": 2,
                 "ppo_epochs": 1, "max_new_tokens": 4},
        "ppo": {**common, "sft_checkpoint": sft_ckpt, "reward_checkpoint": str(root / "rm"), "prompts": prompts,
                "eval_max_prompts": 2, "mini_batch_size": 2, "generation_batch_size": 2, "ppo_epochs": 1,
                "max_new_tokens": 4},
    }


def per_process(stage: str, processes: int) -> dict[str, Any]:
    """One step's share of each process: the global batch is the same for 1 and 2 processes."""
    out: dict[str, Any] = {"grad_accum": 2 // processes}
    if stage in ("ppo", "grpo"):
        out["rollout_batch_size"] = 4 // processes
    return out


def in_this_process(stage: str, config: dict[str, Any]) -> None:
    try:
        run_stage(stage, config)
    finally:  # a sharded single-process run made a process group of its own
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data) -> Path:
    root = tmp_path_factory.mktemp("dist")
    configs = stage_configs(root, tiny_data)
    jobs = []
    for stage, base in configs.items():
        single, double = {**base, **per_process(stage, 1)}, {**base, **per_process(stage, 2)}
        in_this_process(stage, {**single, "out_dir": str(root / f"{stage}-single")})
        in_this_process(stage, {**single, "out_dir": str(root / f"{stage}-one"), "max_steps": HALF, "fsdp": True})
        shutil.copytree(root / f"{stage}-one", root / f"{stage}-one-to-two")
        in_this_process(stage, {**single, "out_dir": str(root / f"{stage}-plain-to-fsdp"), "max_steps": HALF})
        jobs += [{"stage": stage, "config": {**double, "out_dir": str(root / f"{stage}-ddp")}},
                 {"stage": stage, "config": {**double, "out_dir": str(root / f"{stage}-fsdp"), "fsdp": True}},
                 {"stage": stage, "config": {**double, "out_dir": str(root / f"{stage}-two"), "max_steps": HALF,
                                             "fsdp": True}},
                 {"stage": stage, "config": {**double, "out_dir": str(root / f"{stage}-one-to-two"), "fsdp": True}},
                 {"stage": stage, "config": {**double, "out_dir": str(root / f"{stage}-ddp-resumed"),
                                             "max_steps": HALF}},
                 {"stage": stage, "config": {**double, "out_dir": str(root / f"{stage}-ddp-resumed")}},
                 {"stage": stage, "config": {**double, "out_dir": str(root / f"{stage}-plain-to-fsdp"), "fsdp": True}},
                 {"stage": stage, "config": {**double, "out_dir": str(root / f"{stage}-ddp-to-one"),
                                             "max_steps": HALF}}]
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(TESTS / "distributed_worker.py"), str(root / "jobs.json")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for stage, base in configs.items():  # 2-process checkpoints, sharded and not, resumed by one plain process
        shutil.copytree(root / f"{stage}-two", root / f"{stage}-two-to-one")
        in_this_process(stage, {**base, **per_process(stage, 1), "out_dir": str(root / f"{stage}-two-to-one")})
        in_this_process(stage, {**base, **per_process(stage, 1), "out_dir": str(root / f"{stage}-ddp-to-one")})
    return root


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)), steps
    return [r["loss"] for r in steps]


def assert_same_run(run: Path, reference: Path) -> None:
    """The same loss at every step, the same tokens trained on and the same final weights, up to
    fp32 rounding (which Adam magnifies for parameters whose gradients are nearly zero: weights
    move ~lr = 1e-3 a step)."""
    assert losses(run) == pytest.approx(losses(reference), rel=1e-4, abs=1e-6)
    mine_ckpt, ref_ckpt = load_checkpoint(run), load_checkpoint(reference)
    assert mine_ckpt["trainer"]["tokens_seen"] == ref_ckpt["trainer"]["tokens_seen"]
    mine, ref = mine_ckpt["model"], ref_ckpt["model"]
    assert mine.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(mine[k], ref[k], rtol=1e-3, atol=2e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("layout", ["ddp", "fsdp", "ddp-resumed"])
def test_two_processes_follow_one_process(runs, stage, layout):
    """DDP, FSDP, and DDP stopped half-way and resumed with the same number of processes."""
    assert_same_run(runs / f"{stage}-{layout}", runs / f"{stage}-single")
    ckpt = load_checkpoint(runs / f"{stage}-{layout}")
    assert ckpt["trainer"]["world_size"] == 2 and ckpt["trainer"]["step"] == STEPS
    assert ("sharded" in ckpt["trainer"]) == (layout == "fsdp")
    assert ("optimizer" in ckpt) == (layout != "fsdp")  # a sharded run's optimizer lives in its shards
    if stage in ("ppo", "grpo") and layout != "ddp-resumed":
        # two candidates ranked by rank 0, the starting policy and the one evaluation at the end:
        # best.pt holds the weights of the one it chose, gathered whole
        best = load_checkpoint(runs / f"{stage}-{layout}" / "best.pt")
        single = load_checkpoint(runs / f"{stage}-single" / "best.pt")
        assert best["extra"]["best"]["step"] == single["extra"]["best"]["step"] in (0, STEPS)
        assert best["model"].keys() == ckpt["model"].keys()
        # the last weights, or the starting policy's: the same weights one process kept
        chosen = ckpt["model"] if best["extra"]["best"]["step"] == STEPS else single["model"]
        assert all(torch.equal(best["model"][k], chosen[k]) for k in chosen)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("direction", ["one-to-two", "two-to-one", "plain-to-fsdp", "ddp-to-one"])
def test_checkpoint_resumes_on_another_number_of_processes(runs, stage, direction):
    """A sharded checkpoint of 1 process resumed sharded on 2, one of 2 resumed by 1 plain process;
    a plain checkpoint of 1 process resumed sharded on 2, one of 2 (DDP) resumed by 1."""
    assert_same_run(runs / f"{stage}-{direction}", runs / f"{stage}-single")
    ckpt = load_checkpoint(runs / f"{stage}-{direction}")
    assert ckpt["trainer"]["world_size"] == (2 if direction in ("one-to-two", "plain-to-fsdp") else 1)
    shards = runs / f"{stage}-{direction}" / "checkpoint.shards"
    if direction in ("one-to-two", "plain-to-fsdp"):  # only the latest step's shards are kept
        assert [p.name for p in shards.iterdir()] == [f"step-{STEPS:08d}"]
    elif direction == "two-to-one":  # a plain checkpoint holds everything; the shards it resumed from are gone
        assert "optimizer" in ckpt and not any(shards.iterdir())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_runs_the_ppo_command(runs, tmp_path):
    """``torchrun --nproc_per_node 2 -m fastgpt ppo`` on the CPU, prompts from the built-in world
    (written once by rank 0): one summary line, one checkpoint written by 2 processes. A tiny
    early_stop_kl ends a rollout's updates once the policy moved: the processes must agree on it,
    or the next rollout's collectives would wait forever."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ppo"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "fastgpt", "ppo", "--sft_checkpoint", str(runs / "sft-start"),
                           "--reward_checkpoint", str(runs / "rm"), "--out_dir", str(out), "--device", "cpu",
                           "--max_steps", "3", "--rollout_batch_size", "2", "--mini_batch_size", "2",
                           "--max_new_tokens", "4", "--eval_max_prompts", "2", "--progress", "false",
                           "--ppo_epochs", "4", "--early_stop_kl", "1e-12"],
                          capture_output=True, text=True, timeout=280, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("ppo: 3 steps in")]
    assert len(summaries) == 1, proc.stdout
    ckpt = load_checkpoint(out)
    assert ckpt["trainer"]["world_size"] == 2 and ckpt["trainer"]["step"] == 3
    # 4 steps a rollout without early stopping; the policy moved by step 2, which stopped the first
    assert ckpt["task"][0]["rollouts_done"] == 2
    assert sorted(p.name for p in (out / "builtin").iterdir()) == ["eval_prompts-seed0.jsonl",
                                                                    "ppo_prompts-seed0.jsonl"]
