"""Tiny random models and an offline tokenizer: fixtures for tests, docs and quick experiments.

They run the same TransformerLens bridge code paths as real models (Llama with GQA + RoPE, GPT-2
with learned positions, Qwen2 with GQA and biases, Gemma-3 with a sliding window, QK-norm and its own
attention scale) in milliseconds and need no download.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch

__all__ = ["tiny_tokenizer", "tiny_hf_model", "tiny_model", "TinyArch"]

TinyArch = Literal["llama", "llama_mha", "gpt2", "qwen2", "gemma3"]

_CORPUS = [
    "The capital of Veloria is Quentor. The capital of Marn is Pell.",
    "Write a high-quality answer for the given question using only the provided search results.",
    "Document [1](Title: Alpha) Question: What is the answer? Answer: it is blue.",
    "key value retrieval: extract the value corresponding to the specified key in the JSON object.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?()[]{}\"'-_/\n",
]

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


@lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained in-process on a few sentences (offline, deterministic).

    Special tokens: ``<|endoftext|>`` (BOS/EOS/pad, id 0), ``<|im_start|>``, ``<|im_end|>``; it has a
    ChatML chat template and prepends BOS, so it exercises the double-BOS guard of prompts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHATML
    return tok


def tiny_hf_model(arch: TinyArch = "llama", *, seed: int = 0, n_layers: int = 2, vocab_size: int | None = None):
    """A randomly initialised Hugging Face causal LM with the given architecture (fp32, eval)."""
    import transformers as tf

    vocab = vocab_size or len(tiny_tokenizer())
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch in ("llama", "llama_mha"):
        cfg = tf.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
            num_attention_heads=4, num_key_value_heads=2 if arch == "llama" else 4, head_dim=16,
            max_position_embeddings=512, rope_theta=10000.0, **common,
        )
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=n_layers, n_head=4, n_positions=512, **common)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common,
        )
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "gemma3":
        # Layer 0 slides (window 8: prompts of ~30 tokens exercise the window), layer 1 is global;
        # query_pre_attn_scalar=16 gives scale 1/4 = 1/sqrt(head_dim), read from the module anyway.
        # ``architectures`` is what the TransformerLens bridge dispatches on.
        cfg = tf.Gemma3TextConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
            layer_types=(["sliding_attention", "full_attention"] * n_layers)[:n_layers],
            query_pre_attn_scalar=16, max_position_embeddings=512,
            architectures=["Gemma3ForCausalLM"], **common,
        )
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(f"Unknown tiny architecture {arch!r}; use one of llama, llama_mha, gpt2, qwen2, gemma3.")
    # Random init gives near-uniform attention; sharpen it so that interventions are visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("q_proj", "k_proj", "c_attn")) and p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


def tiny_model(arch: TinyArch = "llama", *, seed: int = 0, n_layers: int = 2):
    """A tiny random model wrapped as a TransformerLens bridge (what focuslens functions take)."""
    from .models import load_model

    hf = tiny_hf_model(arch, seed=seed, n_layers=n_layers)
    model = load_model(hf, tokenizer=tiny_tokenizer())
    model.cfg.model_name = f"tiny-{arch}"
    return model
