"""Tiny random models and an offline tokenizer: fixtures for tests, docs and quick experiments.

They run the same TransformerLens bridge code paths as real models (Llama with GQA + RoPE, GPT-2
with learned positions, Qwen2 with GQA and biases, Gemma-3 with a sliding window, QK-norm and its own
attention scale) in milliseconds and need no download.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch

__all__ = ["tiny_tokenizer", "tiny_hf_model", "tiny_model", "write_tiny_gguf", "TinyArch", "random_directions",
           "random_head_means", "greedy_steps"]

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
    from .core.models import load_model

    hf = tiny_hf_model(arch, seed=seed, n_layers=n_layers)
    model = load_model(hf, tokenizer=tiny_tokenizer())
    model.cfg.model_name = f"tiny-{arch}"
    return model


def write_tiny_gguf(path, hf=None, tok=None, *, chat_template: str | None = None):
    """Write a float32 GGUF file of a tiny HF Llama (default: ``tiny_hf_model("llama")`` with
    :func:`tiny_tokenizer`), laid out as llama.cpp's converter writes one: q/k rows permuted to its
    rotary layout, the byte-level BPE tokenizer (tokens, merges) as metadata, and ``chat_template``
    only when given (``None``: a base model without one). Needs the ``gguf`` package. Returns ``path``."""
    import json

    import gguf
    import numpy as np

    hf = tiny_hf_model("llama") if hf is None else hf
    tok = tiny_tokenizer() if tok is None else tok
    cfg = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_token_list(tokens)
    w.add_token_types([3 if t in set(tok.all_special_tokens) else 1 for t in tokens])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    def permute(x, n_head):  # llama.cpp convert_hf_to_gguf.LlamaModel.permute
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        for hf_name, gg_name in names.items():
            w.add_tensor(f"blk.{i}.{gg_name}.weight", sd[p + hf_name + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --------------------------------------------------------------------------------------------------
# Slow references shared by the tests (one definition each)
# --------------------------------------------------------------------------------------------------


def capital_example(i: int, n_docs: int = 3):
    """A tiny "The capital of A<j> is <V>." task record with the gold at ``i % n_docs``."""
    from .tasks import Document, TaskExample

    ctxs = [Document(title=f"A{j}", text=f"The capital of A{j} is {chr(66 + j)}{i % 5}.") for j in range(n_docs)]
    g = i % n_docs
    return TaskExample(question=f"What is the capital of A{g}?", answers=[f"{chr(66 + g)}{i % 5}"], ctxs=ctxs,
                       gold_index=g)


def naive_greedy(model, tokens, n: int) -> list[int]:
    """Slow reference for greedy decoding: a full forward pass without any cache for every new token."""
    seq, out = torch.as_tensor(tokens).reshape(1, -1), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(seq)[0, -1].argmax())
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]], device=seq.device)], dim=1)
    return out


def grab_hooks(model, tokens, names) -> dict:
    """The first batch row of each named hook point's activation in one forward pass (no grad)."""
    from .core.hooks import attach_hooks

    store: dict = {}

    def make(n):
        def fn(x, hook):
            store[n] = x[0].detach()
            return x

        return fn

    with attach_hooks(model, [(n, make(n)) for n in names]), torch.no_grad():
        model(tokens)
    return store


def pattern_mass(model, examples, heads, directions=None, alpha: float = 1.0, column: str = "relevant"):
    """Ground truth read from ``hook_pattern`` in live passes: mean response-row mass on the relevant
    span (or the sink, ``column="sink"``) per head, with ``directions`` applied at ``alpha`` if given."""
    from .core.models import hook_name

    layers = sorted({l for l, _ in heads})
    out = torch.zeros(len(heads))
    for ex in examples:
        handle = directions.apply(model, alpha=alpha) if directions is not None else None
        try:
            st = grab_hooks(model, ex.prompt.tokens[None], [hook_name(l, "hook_pattern") for l in layers])
        finally:
            if handle is not None:
                handle.remove()
        r = ex.prompt.response
        cols = ex.relevant.slice if column == "relevant" else slice(0, 1)
        for i, (l, h) in enumerate(heads):
            out[i] += st[hook_name(l, "hook_pattern")][h, r.start:r.end, cols].sum(-1).mean()
    return out / len(examples)


def random_directions(model, heads=((1, 2), (0, 1), (1, 3)), *, seed: int = 0, scale: float = 3.0,
                      alpha: float = 0.5):
    """Seeded random :class:`~focuslens.directions.artefact.FocusDirections` for ``model`` (tests of steering routes)."""
    from .core.attention import query_site
    from .core.models import model_info
    from .directions.artefact import FocusDirections

    info = model_info(model)
    g = torch.Generator().manual_seed(seed)
    return FocusDirections(heads=list(heads), vectors=torch.randn(len(heads), info.d_head, generator=g) * scale,
                           fingerprint=info.fingerprint(), model_name=info.name, site=query_site(model), alpha=alpha)


def random_head_means(model, heads, *, seed: int = 1) -> dict:
    """Seeded random per-head means (``{(layer, head): [d_head]}``) for ``Ablate(mode="mean")`` tests."""
    from .core.models import model_info

    g = torch.Generator().manual_seed(seed)
    return {h: torch.randn(model_info(model).d_head, generator=g) for h in heads}


@torch.no_grad()
def greedy_steps(model, ids: torch.Tensor, mask: "torch.Tensor | None", n: int, *, forward=None):
    """``n`` greedy steps with the KV cache from a ``[b, P]`` prefill: ``(tokens [b, n], logits [b, n, vocab])``.

    ``forward`` (default: the hooked model's cached forward pass) is any
    :class:`~focuslens.core.generation.Forward`, e.g. the fused engine's ``forward_with_cache``; the
    logits are each step's last-position logits in fp32, so two routes compare step by step.
    """
    from .core.forward import forward_with_cache

    fwd = forward or (lambda t, c=None, **kw: forward_with_cache(model, t, c, **kw))
    logits, cache = fwd(ids, attention_mask=mask, logits_to_keep=1)
    toks, outs = [], []
    for _ in range(n):
        outs.append(logits[:, -1].float())
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits, cache = fwd(nxt, cache, attention_mask=mask)
    return torch.cat(toks, 1), torch.stack(outs, 1)
