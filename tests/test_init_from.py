"""Starting a stage from a Hugging Face folder does what the flags say (issue 15): the context and
dropout may change, other model settings are refused by name, no preset is mixed in, the batch
is sized for the model and printed, and a dataset made with another tokenizer is named as such."""
from __future__ import annotations

import json

import pytest
import torch

from fastgpt.checkpoint import load_checkpoint
from fastgpt.cli import main
from fastgpt.data import prepare
from fastgpt.tokenizer import ByteTokenizer, load_tokenizer

from hf_models import write_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory, corpus_jsonl):
    """A random GPT-2 and a random Llama folder (96-token contexts), each with a dataset prepared
    with its own tokenizer, and a byte-level dataset."""
    root = tmp_path_factory.mktemp("init")
    out = {}
    for arch in ("gpt2", "llama"):
        write_model(root / arch, arch)
        prepare([corpus_jsonl], root / f"data-{arch}", load_tokenizer(root / arch), val_fraction=0.1, progress=False)
        out[arch] = (root / arch, root / f"data-{arch}")
    prepare([corpus_jsonl], root / "data-byte", ByteTokenizer(), val_fraction=0.1, progress=False)
    out["byte"] = root / "data-byte"
    return out


def pretrain(folder, data, out, *flags: str) -> int:
    return main(["pretrain", "--init_from", f"hf:{folder}", "--data", str(data), "--out_dir", str(out),
                 "--max_steps", "1", "--eval_batches", "1", "--device", "cpu", "--progress", "false", *flags])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_context_and_dropout_are_honoured(model_and_data, tmp_path, capsys, arch):
    folder, data = model_and_data[arch]
    assert pretrain(folder, data, tmp_path, "--model.block_size", "32", "--model.dropout", "0.1",
                    "--batch_size", "3") == 0
    assert "micro-batch 3 rows x 32 tokens, grad_accum 1: 96 tokens per step" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["model_config"]["block_size"] == 32 and ckpt["model_config"]["dropout"] == 0.1
    assert ckpt["model_config"]["n_layer"] == 3  # the imported model, not the tiny preset's 4 layers
    if arch == "gpt2":
        assert ckpt["model"]["wpe.weight"].shape == (32, 60)


def test_batch_and_context_come_from_the_model(model_and_data, tmp_path, capsys):
    folder, data = model_and_data["llama"]
    assert pretrain(folder, data, tmp_path) == 0
    printed = capsys.readouterr().out
    assert "micro-batch 16 rows x 96 tokens" in printed and "grad_accum 1: 1,536 tokens per step" in printed


@pytest.mark.parametrize("flags, message", [
    (["--model.n_layer", "4"], "model.n_layer: the model comes from init_from=hf:"),
    (["--model.norm", "layernorm"], "model.norm: the model comes from init_from=hf:"),
    (["--model.block_size", "200"], "model.block_size=200: expected a context between 1 and the model's 96"),
    (["--preset", "tiny"], "--preset tiny sizes a new model, but init_from=hf:"),
])
def test_settings_that_need_other_weights_are_refused(model_and_data, tmp_path, capsys, flags, message):
    folder, data = model_and_data["llama"]
    assert pretrain(folder, data, tmp_path, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_dataset_of_another_tokenizer_is_named(model_and_data, tmp_path, capsys):
    folder, _ = model_and_data["gpt2"]
    assert pretrain(folder, model_and_data["byte"], tmp_path) == 2
    err = capsys.readouterr().err
    assert "uses another tokenizer (a byte tokenizer, 262 ids" in err and "the model's is a hf tokenizer" in err
    assert f"prepare the data with --tokenizer {folder}" in err


def test_sft_context_flag_and_grad_checkpointing(model_and_data, tmp_path, capsys):
    folder, _ = model_and_data["llama"]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {i}", "response": f"{i} is the cat"}) + "\n"
                            for i in range(12)))
    assert main(["sft", "--init_from", f"hf:{folder}", "--data", str(data), "--out_dir", str(tmp_path / "o"),
                 "--max_steps", "1", "--block_size", "80", "--batch_size", "2", "--grad_checkpointing", "true",
                 "--eval_format_prompts", "0", "--device", "cpu", "--progress", "false"]) == 0
    assert "micro-batch 2 rows x 80 tokens" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "o")
    assert ckpt["model_config"]["block_size"] == 80 and ckpt["config"]["grad_checkpointing"] is True
    assert torch.isfinite(torch.tensor(ckpt["history"][-1].get("loss", 0.0)))


def test_library_refuses_changed_model_settings(model_and_data, tmp_path):
    """From Python, a model setting that differs from ModelConfig's default and the start model's
    is refused by the stage itself."""
    from fastgpt.config import ConfigError, ModelConfig
    from fastgpt.stages.pretrain import PretrainConfig, pretrain as run
    folder, data = model_and_data["llama"]
    cfg = PretrainConfig(init_from=f"hf:{folder}", data=str(data), out_dir=str(tmp_path), max_steps=1,
                         model=ModelConfig(n_kv_head=3), device="cpu", progress=False)
    with pytest.raises(ConfigError, match=r"model.n_kv_head=3: the model comes from init_from=hf:.* \(its n_kv_head is 2\)"):
        run(cfg)
