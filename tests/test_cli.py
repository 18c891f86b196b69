"""The command line: help and a smoke run in real subprocesses (``python -m fastgpt.cli``), and
every bad input as exactly one stderr line, exit status 2, damaging nothing already written (the
error cases call ``fastgpt.cli.main`` in-process to skip the interpreter start-up)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastgpt.data import load_meta, write_shard

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model.block_size", "32", "--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32",
         "--batch_size", "2", "--eval_batches", "1", "--eval_interval", "0", "--progress", "false",
         "--device", "cpu", "--warmup_steps", "1"]


def fastgpt(*args, cwd=None, check=False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "fastgpt.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    """``fastgpt`` in this process (no interpreter start-up): the error cases run fast."""
    from fastgpt.cli import main

    def call(*args) -> Result:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            code = e.code
        out, err = capsys.readouterr()
        return Result(code, out, err)
    return call


def snapshot(folder: Path) -> dict[str, str]:
    """Digest of every file under ``folder`` (to prove that a failed command changed nothing)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "error" in lines[0] and "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, corpus_jsonl):
    """prepare + a 3-step pretrain through the CLI (the smoke run), shared read-only by the tests."""
    ws = tmp_path_factory.mktemp("cli")
    proc = fastgpt("prepare", corpus_jsonl, "--out", ws / "data", "--val-fraction", "0.1", check=True)
    assert "train" in proc.stdout and "byte tokenizer" in proc.stdout
    proc = fastgpt("pretrain", "--preset", "tiny", "--max_steps", "3", "--data", ws / "data",
                   "--out_dir", ws / "run", *SMALL, check=True)
    assert "pretrain: 3 steps" in proc.stdout
    return ws


def test_help():
    proc = fastgpt("--help", check=True)
    for cmd in ("prepare", "pretrain", "sample", "sft", "reward", "ppo", "dpo", "grpo", "compare-methods"):
        assert cmd in proc.stdout
    proc = fastgpt("pretrain", "--help", check=True)
    for flag in ("--preset", "--config", "--fresh", "--lr", "--model.n_layer", "--data", "--max_steps"):
        assert flag in proc.stdout
    assert fastgpt("prepare", "--help", check=True).stdout.count("--out") >= 1
    assert "usage: fastgpt" in fastgpt().stdout  # no command: the help


def help_entries(text: str) -> dict[str, str]:
    """{--flag: its help text} from argparse's help output (one entry per flag line)."""
    entries, flag = {}, None
    for line in text.splitlines():
        if line.startswith("  --"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line.strip().split("  ", 1)[1].strip() if "  " in line.strip() else ""
        elif flag and line.startswith(" " * 10):
            entries[flag] = (entries[flag] + " " + line.strip()).strip()
        else:
            flag = None
    return entries


@pytest.mark.parametrize("command", ["pretrain", "sft", "reward", "ppo", "dpo", "grpo"])
def test_every_setting_has_a_description_choices_and_its_default(command, cli):
    from fastgpt.commands.settings import config_fields
    from fastgpt.stages import configs
    cls = {"pretrain": configs.PretrainConfig, "sft": configs.SFTConfig, "reward": configs.RewardConfig,
           "ppo": configs.PPOConfig, "dpo": configs.DPOConfig, "grpo": configs.GRPOConfig}[command]
    proc = cli(command, "--help")
    assert proc.returncode == 0
    entries = help_entries(proc.stdout)
    for name, _, description in config_fields(cls):
        text = entries[f"--{name}"]
        assert description and text.startswith(description.split()[0]) and "(default: " in text, (name, text)
    if command == "ppo":
        assert "{reward,head}" in proc.stdout and "{k1,k3}" in proc.stdout
    if command == "dpo":
        assert "{sigmoid,ipo}" in proc.stdout and "--lora_rank" in proc.stdout
    if command == "grpo":
        assert "{grpo,rloo}" in proc.stdout and "{token,sequence}" in proc.stdout
    if command == "pretrain":
        for choices in ("{layernorm,rmsnorm}", "{gelu,swiglu}", "{learned,rope}", "{auto,bf16,fp32}"):
            assert choices in proc.stdout


def test_pretrain_help_shows_the_preset_in_use(cli):
    tiny = help_entries(cli("pretrain", "--help").stdout)
    assert "(default: 4;" in tiny["--model.n_layer"] and "(default: 256;" in tiny["--model.block_size"]
    assert "(default: 600;" in tiny["--max_steps"]
    small = help_entries(cli("pretrain", "--preset", "small", "--help").stdout)
    assert "(default: 6;" in small["--model.n_layer"] and "(default: 1500;" in small["--max_steps"]
    big = cli("pretrain", "--preset", "gpt2-small", "--help").stdout
    assert "defaults from preset gpt2-small" in big and "(default: 1024;" in help_entries(big)["--model.block_size"]


def test_sampling_flags_show_their_defaults(cli):
    chat, sample = help_entries(cli("chat", "--help").stdout), help_entries(cli("sample", "--help").stdout)
    assert "(default: 0.7)" in chat["--temperature"] and "(default: 0.8)" in sample["--temperature"]
    for flag in ("--top-k", "--top-p", "--repetition-penalty", "--max-new-tokens", "--seed", "--device"):
        assert "(default: " in chat[flag] and "(default: " in sample[flag], flag


HELP_PROBE = """
import sys
from fastgpt.cli import COMMANDS, main
leaked = []
for name in COMMANDS:
    try:
        main([name, "--help"])
    except SystemExit:
        pass
    leaked += [f"{name}:{m}" for m in ("torch", "numpy", "tokenizers", "matplotlib") if m in sys.modules]
print("LEAKED", leaked)
"""


def test_help_is_instant_for_every_command():
    """No command imports torch (or other heavy packages) before its arguments are parsed."""
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "LEAKED []" in proc.stdout, proc.stdout[-500:]


OMP_PROBE = """
import os, sys
seen = {}
def hook(event, args):
    if event == "import" and args[0] == "torch" and "torch" not in seen:
        seen["torch"] = os.environ.get("OMP_WAIT_POLICY")
sys.addaudithook(hook)
from fastgpt.cli import main
main(["sample", sys.argv[1], "--device", "cpu"])
print("AT_TORCH_IMPORT", seen.get("torch"), "THREADS", __import__("torch").get_num_threads())
"""


@pytest.mark.parametrize("preset, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_passive_openmp_wait_policy_is_set_before_torch_loads(tmp_path, preset, expected):
    """A busy machine: spinning OpenMP threads are slow there, so the CLI makes them wait passively
    (before torch loads) unless the user chose a policy; OMP_NUM_THREADS is left to the user."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **({"OMP_WAIT_POLICY": preset} if preset else {}))
    proc = subprocess.run([sys.executable, "-c", OMP_PROBE, str(tmp_path / "none")], capture_output=True,
                          text=True, timeout=120, env=env)
    assert f"AT_TORCH_IMPORT {expected} THREADS 1" in proc.stdout, (proc.stdout, proc.stderr)


def test_sample_chat_needs_a_prompt(workspace, cli):
    assert_one_line_error(cli("sample", workspace / "run", "--chat", "--device", "cpu"), "--chat needs --prompt")


@pytest.mark.parametrize("flag, value", [("--max_steps", "-5"), ("--max_steps", "0"), ("--batch_size", "-1"), ("--grad_accum", "0"),
                                         ("--lr", "0"), ("--eval_batches", "0"), ("--model.dropout", "1.5")])
def test_non_positive_counts_are_refused(workspace, tmp_path, cli, flag, value):
    proc = cli("pretrain", "--data", workspace / "data", "--out_dir", tmp_path / "r", *SMALL, flag, value)
    assert_one_line_error(proc, flag.lstrip("-"), value)
    assert not (tmp_path / "r").exists()


def test_prepare_takes_any_text_files(tmp_path, cli):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("print('hello')\n" * 20)
    (src / "b.md").write_text("# title\n\nsome text\n" * 20)
    (src / "c.txt").write_text("not taken\n")
    proc = cli("prepare", src, "--ext", ".py,md", "--out", tmp_path / "d", "--val-fraction", "0")
    assert proc.returncode == 0, proc.stderr
    assert "2 train / 0 val documents" in proc.stdout
    assert_one_line_error(cli("prepare", tmp_path / "nothing" / "*.rs", "--out", tmp_path / "e"), "no files match")


def test_everything_written_gets_umask_permissions(corpus_jsonl, tmp_path):
    from fastgpt.data import prepare
    from fastgpt.tokenizer import ByteTokenizer
    old = os.umask(0o022)
    try:
        prepare([corpus_jsonl], tmp_path / "d", ByteTokenizer(), val_fraction=0.1, progress=False)
    finally:
        os.umask(old)
    written = [p for p in (tmp_path / "d").iterdir() if p.is_file()]
    assert len(written) >= 3 and all(p.stat().st_mode & 0o777 == 0o644 for p in written)


def test_smoke_prepare_pretrain_sample(workspace):
    meta = load_meta(workspace / "data")
    assert meta["shards"]["train"] and meta["shards"]["val"]
    records = [json.loads(l) for l in (workspace / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("step") == 3 and "loss" in r for r in records)
    proc = fastgpt("sample", workspace / "run", "--prompt", "The cat", "--max-new-tokens", "12",
                   "--num-samples", "2", "--device", "cpu", check=True)
    assert proc.stdout.count("--- sample") == 2 and proc.stdout.count("The cat") == 2
    proc = fastgpt("sample", workspace / "run" / "checkpoint.pt", "--chat", "--prompt", "hi",
                   "--max-new-tokens", "5", "--device", "cpu", check=True)
    # a real process's stderr on a bad input: one line, status 2
    assert_one_line_error(fastgpt("sample", workspace / "nothing", "--device", "cpu"), "nothing", "not found")
    assert_one_line_error(fastgpt("pretrain", "--preset", "huge"), "huge")


@pytest.fixture
def run_copy(workspace, tmp_path):
    shutil.copytree(workspace / "run", tmp_path / "run")
    return tmp_path / "run"


def test_bad_data_inputs(workspace, tmp_path, cli):
    proc = cli("pretrain", "--data", tmp_path / "nodata", "--out_dir", tmp_path / "r", *SMALL)
    assert_one_line_error(proc, "nodata", "meta.json")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(cli("prepare", empty, "--out", tmp_path / "d"), "empty.txt")
    assert_one_line_error(cli("prepare", tmp_path / "missing.jsonl", "--out", tmp_path / "d"), "missing.jsonl")
    proc = cli("pretrain", "--data", workspace / "data", "--out_dir", tmp_path / "r", *SMALL,
                   "--model.block_size", "100000")
    assert_one_line_error(proc, "block_size", "100001")
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_ids_beyond_vocab(workspace, tmp_path, cli):
    data = tmp_path / "data"
    shutil.copytree(workspace / "data", data)
    name = load_meta(data)["shards"]["train"][0]
    write_shard(data / name, np.arange(1000) % 300 + 69_000, 70_000)  # a shard from a larger vocabulary
    proc = cli("pretrain", "--data", data, "--out_dir", tmp_path / "r", *SMALL)
    assert_one_line_error(proc, name, "70000")


def test_malformed_jsonl_leaves_existing_dataset(workspace, tmp_path, cli, corpus_docs):
    data = tmp_path / "data"
    shutil.copytree(workspace / "data", data)
    before = snapshot(data)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_docs) + "{oops\n")
    proc = cli("prepare", bad, "--out", data, "--shard-tokens", "200")  # shards fill before the bad line
    assert_one_line_error(proc, f"bad.jsonl:{len(corpus_docs) + 1}")
    assert snapshot(data) == before


@pytest.mark.parametrize("args, needles", [
    (["--bogus", "1"], ["--bogus"]),
    (["--model.n_layers", "1"], ["--model.n_layers"]),
    (["--preset", "huge"], ["huge"]),
    (["--max_steps", "many"], ["max_steps"]),
    (["--model.n_head", "3"], ["model.n_head"]),
    (["--model.norm", "batch"], ["model.norm"]),
])
def test_bad_config_flags(run_copy, workspace, cli, args, needles):
    before = snapshot(run_copy)
    proc = cli("pretrain", "--data", workspace / "data", "--out_dir", run_copy, *SMALL, "--max_steps", "6", *args)
    assert_one_line_error(proc, *needles)
    assert snapshot(run_copy) == before


def test_bad_config_file(run_copy, workspace, cli, tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("[model]\nn_layers = 1\n")
    before = snapshot(run_copy)
    proc = cli("pretrain", "--config", toml, "--data", workspace / "data", "--out_dir", run_copy, *SMALL)
    assert_one_line_error(proc, "bad.toml", "model.n_layers")
    assert snapshot(run_copy) == before


def test_other_architecture_checkpoint(run_copy, workspace, cli):
    before = snapshot(run_copy)
    proc = cli("pretrain", "--data", workspace / "data", "--out_dir", run_copy, *SMALL, "--max_steps", "6",
                   "--model.n_layer", "2")
    assert_one_line_error(proc, "checkpoint.pt", "another architecture")
    assert snapshot(run_copy) == before


def test_truncated_checkpoint(run_copy, workspace, cli):
    ckpt = run_copy / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    before = snapshot(run_copy)
    assert_one_line_error(cli("sample", run_copy, "--device", "cpu"), "checkpoint.pt", "truncated")
    proc = cli("pretrain", "--data", workspace / "data", "--out_dir", run_copy, *SMALL, "--max_steps", "6")
    assert_one_line_error(proc, "checkpoint.pt", "truncated")
    assert snapshot(run_copy) == before
    assert_one_line_error(cli("sample", run_copy.parent / "nothing", "--device", "cpu"), "not found")


def test_pretrain_rerun_is_refused_resumed_or_started_fresh(workspace, tmp_path, capsys):
    import json

    from helpers import rerun_tells_the_truth
    base = ["--data", workspace / "data", *SMALL]
    rerun_tells_the_truth(capsys, "pretrain", tmp_path / "run", base, {"lr": "1e-3", "model.dropout": "0.1"})
    from fastgpt.cli import main
    assert main(["pretrain", *map(str, base), "--out_dir", str(tmp_path / "run"), "--max_steps", "2", "--lr", "1e-3",
                 "--fresh"]) == 0
    assert "resuming" not in capsys.readouterr().out
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2  # the old run's records went with it
