"""Random Hugging Face model folders for the import / export / chat-template tests.

Tiny ``transformers`` models of every supported architecture, with odd sizes, and byte-level BPE
tokenizers whose special tokens and chat templates are written here in the styles of Llama 3,
Qwen (ChatML with a default system message), SmolLM2 (ChatML whose pad token is its end of turn)
and Mistral ([INST] ... [/INST] answer</s>). Nothing is downloaded.
"""
from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

import torch

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = 'You are helpful.' %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\n{{ system }}<|eot_id|>"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a cat.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SMOLLM_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('system messages are not supported') }}"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }}[/INST]"
    "{% else %} {{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}")

# style -> special tokens, template, tokenizer_config tokens, whether the post-processor adds bos
STYLES: dict[str, dict[str, Any]] = {
    "llama3": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"], template=LLAMA3_TEMPLATE, add_bos=True,
                   tokens=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")),
    "chatml": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], template=CHATML_TEMPLATE, add_bos=False,
                   tokens=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")),
    "smollm": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], template=SMOLLM_TEMPLATE, add_bos=False,
                   tokens=dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>")),
    "mistral": dict(specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], template=MISTRAL_TEMPLATE, add_bos=True,
                    tokens=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")),
}
END_OF_TURN = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "smollm": "<|im_end|>", "mistral": "</s>"}

WORDS = ("the cat sat on a mat while seven dogs ran past the old red barn hello world what is two plus "
         "three answer question naïve café 東京 please thanks").split()


def _corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@functools.lru_cache(maxsize=None)
def _tokenizer_json(style: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    spec = STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=331, special_tokens=spec["specials"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    if spec["add_bos"]:  # as Llama's tokenizer.json does: plain tokenizer(text) calls prepend bos
        bos = spec["tokens"]["bos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok.to_str()


def write_tokenizer(folder: str | Path, style: str) -> int:
    """tokenizer.json + tokenizer_config.json of ``style`` in ``folder``; returns the vocabulary size."""
    from tokenizers import Tokenizer
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_str(_tokenizer_json(style))
    tok.save(str(folder / "tokenizer.json"))
    spec = STYLES[style]
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": spec["template"],
           "clean_up_tokenization_spaces": False, **spec["tokens"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return tok.get_vocab_size(with_added_tokens=True)


# ------------------------------------------------------------------------------ models
# architecture -> (transformers config class, causal-LM class, chat style, odd-sized config)
def _arch(name: str, vocab: int) -> tuple[Any, Any, str, dict[str, Any]]:
    import transformers as tf
    llama = dict(vocab_size=vocab, hidden_size=60, intermediate_size=94, num_hidden_layers=3,
                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=96, rms_norm_eps=1e-5,
                 initializer_range=0.15)
    return {
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, "chatml",
                 dict(vocab_size=vocab, n_layer=3, n_embd=60, n_head=6, n_positions=96, n_inner=94,
                      initializer_range=0.15)),
        # Llama 3.1-style: untied, GQA, llama3 RoPE scaling whose bands all fall inside head_dim 10
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, "llama3",
                  dict(llama, tie_word_embeddings=False, rope_theta=5000.0,
                       rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=32))),
        # SmolLM2-style: a Llama with tied embeddings and a large RoPE base
        "smollm": (tf.LlamaConfig, tf.LlamaForCausalLM, "smollm",
                   dict(llama, tie_word_embeddings=True, rope_theta=100000.0)),
        # Qwen2-style: q/k/v biases, tied embeddings, sliding window configured but not in use
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, "chatml",
                  dict(llama, tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False,
                       sliding_window=32)),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, "mistral",
                    dict(llama, tie_word_embeddings=False, sliding_window=None)),
    }[name]


ARCHITECTURES = ("gpt2", "llama", "smollm", "qwen2", "mistral")


def hf_causal_lm(name: str, vocab: int, seed: int = 0, **overrides: Any):
    """A random ``transformers`` causal LM of architecture ``name`` in eval mode, fp32, eager
    attention, with every norm weight and bias perturbed (ones and zeros would hide mistakes)."""
    config_cls, model_cls, _, kwargs = _arch(name, vocab)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**kwargs, **overrides}, attn_implementation="eager")).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname or "ln_" in pname:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def write_model(folder: str | Path, name: str, seed: int = 0, shard: bool = False, **overrides: Any):
    """A random model of architecture ``name`` saved with its chat-style tokenizer; returns the
    ``transformers`` model (its reference)."""
    from tokenizers import Tokenizer
    folder = Path(folder)
    style = _arch(name, 0)[2]
    vocab = write_tokenizer(folder, style) + 3  # models pad their vocabulary past the tokenizer's
    tok, names = Tokenizer.from_file(str(folder / "tokenizer.json")), STYLES[style]["tokens"]
    ids = {f"{k[:-6]}_token_id": tok.token_to_id(names[k]) for k in ("bos_token", "eos_token") if k in names}
    model = hf_causal_lm(name, vocab, seed, **{**ids, **overrides})
    model.save_pretrained(folder, **({"max_shard_size": "40KB"} if shard else {}))
    return model
