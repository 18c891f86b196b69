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
    for cmd in ("prepare", "pretrain", "sample", "sft", "reward", "ppo"):
        assert cmd in proc.stdout
    proc = fastgpt("pretrain", "--help", check=True)
    for flag in ("--preset", "--config", "--lr", "--model.n_layer", "--data", "--max_steps"):
        assert flag in proc.stdout
    assert fastgpt("prepare", "--help", check=True).stdout.count("--out") >= 1
    assert "usage: fastgpt" in fastgpt().stdout  # no command: the help


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
