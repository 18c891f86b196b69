"""Shared fixtures for the foundation tests: a tiny model config, the byte tokenizer and a small
prepared dataset. Everything here is cheap (milliseconds); the kernel tests have their own
conftest (tests/kernels/conftest.py) that sets up the Triton interpreter."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from fastgpt.config import ModelConfig
from fastgpt.data import prepare
from fastgpt.tokenizer import ByteTokenizer

WORDS = ("the cat sat on a mat while seven dogs ran past the old red barn and "
         "nobody asked why birds sing at dawn but everyone listened").split()


def make_corpus(n_docs: int = 60, seed: int = 0) -> list[str]:
    """Deterministic small documents of a few sentences each (~100-300 bytes)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(rng.randint(1, 4))]
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def byte_tok() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory, corpus_docs) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_docs))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, corpus_jsonl) -> Path:
    """A prepared byte-level dataset folder (train + val shards); treat it as read-only."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare([corpus_jsonl], out, ByteTokenizer(), val_fraction=0.1, seed=0, progress=False)
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_thread(request):
    """Tiny models on one intra-op thread (tests directly under tests/ only).

    Their matmuls gain nothing from a second thread, and on a busy 2-core machine OpenMP's
    spinning threads made a 150-step overfit 10x slower (25 s instead of 2 s)."""
    if request.node.path.parent != Path(__file__).parent:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
