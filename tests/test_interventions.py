"""Interventions: exact identities, independent references (HF eager attention re-implemented by
hand), KV-cache generation, other heads untouched, composition and leak-freedom under faults."""

from __future__ import annotations

import contextlib
import importlib
from unittest import mock

import pytest
import torch

from focuslens.hooks import attach_hooks, count_hooks
from focuslens.interventions import compose, inject_vectors, split_softmax, split_softmax_pattern
from focuslens.models import hook_name, model_info
from focuslens.prompts import Span
from focuslens.testing import tiny_hf_model

ARCH_MODULE = {
    "llama": "transformers.models.llama.modeling_llama",
    "gpt2": "transformers.models.gpt2.modeling_gpt2",
    "qwen2": "transformers.models.qwen2.modeling_qwen2",
}

TOKENS = torch.tensor([[0, 5, 17, 33, 8, 91, 120, 44, 7, 60, 250, 13, 99, 150, 31, 77]])
SPAN = Span(4, 9)


def _arch(model) -> str:
    return model.cfg.model_name.removeprefix("tiny-")


# --------------------------------------------------------------------------------------------------
# An independent reference: the HF model (same seed, same weights) with its attention function
# replaced by a hand-written eager attention that applies the edit. Shares no code with focuslens.
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def hf_reference(arch: str, *, query_edit=None, pattern_edit=None):
    hf = tiny_hf_model(arch)  # same seed as the fixture bridge: same weights
    hf.set_attn_implementation("eager")
    mod = importlib.import_module(ARCH_MODULE[arch])

    def attn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        # query [b, H, q, d]; key/value [b, G, k, d] (post-RoPE where rotary)
        layer = module.layer_idx
        H, G = query.shape[1], key.shape[1]
        if query_edit is not None:
            query = query_edit(layer, query)
        key = key.repeat_interleave(H // G, dim=1)
        value = value.repeat_interleave(H // G, dim=1)
        d = query.shape[-1]
        scale = scaling if scaling is not None else d**-0.5
        w = (query @ key.transpose(-1, -2)) * scale
        Q, K = w.shape[-2], w.shape[-1]
        qpos = torch.arange(K - Q, K)[:, None]
        w = w.masked_fill(torch.arange(K)[None, :] > qpos, float("-inf"))
        w = torch.softmax(w.float(), dim=-1).to(query.dtype)
        if pattern_edit is not None:
            w = pattern_edit(layer, w, qpos.flatten())
        out = w @ value
        return out.transpose(1, 2).contiguous(), w

    with mock.patch.object(mod, "eager_attention_forward", attn):
        yield hf


def _ref_split(heads, span_mask_fn, tau):
    """The METHOD.md §3 formula written directly (float64), for the reference model."""

    def edit(layer, w, qpos):
        w = w.clone()
        for (l, h) in heads:
            if l != layer:
                continue
            a = w[:, h].double()  # [b, q, k]
            m = span_mask_fn(a.shape[-1])
            pi = a[..., m].sum(-1, keepdim=True)
            ok = (pi > 0) & (pi < 1)
            pit = pi.clamp_min(1e-300) ** tau
            new = torch.where(
                m, a * pit / pi.clamp_min(1e-300), a * (1 - pit) / (1 - pi).clamp_min(1e-300)
            )
            w[:, h] = torch.where(ok, new, a).to(w.dtype)
        return w

    return edit


def _hf_greedy(hf, tokens, n):
    """Greedy decoding with the HF KV cache, step by step."""
    out = hf(tokens, use_cache=True)
    past, seq = out.past_key_values, tokens
    logits = [out.logits[:, -1]]
    for _ in range(n):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        out = hf(nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits[:, -1])
    return seq, torch.stack(logits, 1)


def _bridge_greedy_full(model, tokens, n):
    """Greedy decoding by a full forward pass per step (no cache)."""
    seq = tokens
    for _ in range(n):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


def _generate(model, tokens, n):
    return model.generate(
        tokens, max_new_tokens=n, do_sample=False, verbose=False, use_past_kv_cache=True, stop_at_eos=False
    )


def _rand_vectors(model, heads, seed=0, scale=2.0, n_slots=None):
    g = torch.Generator().manual_seed(seed)
    d = model_info(model).d_head
    return {h: torch.randn(d, generator=g) * scale for h in heads}


# --------------------------------------------------------------------------------------------------
# inject_vectors
# --------------------------------------------------------------------------------------------------


def test_inject_alpha_zero_is_exact_identity(tiny_any):
    base = tiny_any(TOKENS)
    vecs = _rand_vectors(tiny_any, [(0, 1), (1, 3)])
    with inject_vectors(tiny_any, vecs, alpha=0.0) as h:
        assert h.n_hooks == 2
        out = tiny_any(TOKENS)
    assert torch.equal(out, base)
    assert count_hooks(tiny_any) == 0


@pytest.mark.parametrize("alpha", [0.7, -1.3])
def test_inject_query_matches_hf_reference(tiny_any, alpha):
    arch = _arch(tiny_any)
    heads = [(0, 1), (1, 0), (1, 3)]
    vecs = _rand_vectors(tiny_any, heads)

    def qedit(layer, q):
        q = q.clone()
        for (l, h), u in vecs.items():
            if l == layer:
                q[:, h] = q[:, h] + alpha * u
        return q

    with hf_reference(arch, query_edit=qedit) as hf:
        ref = hf(TOKENS).logits
    base = tiny_any(TOKENS)
    with inject_vectors(tiny_any, vecs, alpha=alpha):
        out = tiny_any(TOKENS)
    assert (out - base).abs().max() > 1e-2, "the injection must change the logits"
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_inject_query_in_cached_generation_matches_hf_and_full_forward(tiny_llama):
    heads = [(0, 2), (1, 1)]
    vecs = _rand_vectors(tiny_llama, heads, seed=3, scale=3.0)

    def qedit(layer, q):
        q = q.clone()
        for (l, h), u in vecs.items():
            if l == layer:
                q[:, h] = q[:, h] + u
        return q

    with hf_reference("llama", query_edit=qedit) as hf:
        ref_seq, _ = _hf_greedy(hf, TOKENS, 8)
    plain = _generate(tiny_llama, TOKENS, 8)
    with inject_vectors(tiny_llama, vecs, alpha=1.0):
        gen = _generate(tiny_llama, TOKENS, 8)
        full = _bridge_greedy_full(tiny_llama, TOKENS, 8)
    assert torch.equal(gen, full)
    assert torch.equal(gen, ref_seq[:, : gen.shape[1]])
    assert not torch.equal(gen, plain), "pick vectors that change the greedy continuation"


def test_inject_other_heads_bit_identical(tiny_llama):
    vecs = _rand_vectors(tiny_llama, [(0, 1)])
    names = [hook_name(0, "hook_z")]
    _, base = tiny_llama.run_with_cache(TOKENS, names_filter=names)
    with inject_vectors(tiny_llama, vecs):
        _, cache = tiny_llama.run_with_cache(TOKENS, names_filter=names)
    z0, z1 = base[names[0]], cache[names[0]]
    for h in range(model_info(tiny_llama).n_heads):
        same = torch.equal(z0[:, :, h], z1[:, :, h])
        assert same == (h != 1), f"head {h}"


def test_inject_key_gqa_group_and_softmax_invariance(tiny_llama):
    info = model_info(tiny_llama)
    assert info.group_size == 2
    names = [hook_name(0, "hook_rot_k"), hook_name(0, "hook_attn_scores"), hook_name(0, "hook_pattern")]
    _, base = tiny_llama.run_with_cache(TOKENS, names_filter=names)
    u = torch.randn(info.d_head) * 3
    with inject_vectors(tiny_llama, {(0, 1): u}, alpha=1.0, site="key"):
        _, c = tiny_llama.run_with_cache(TOKENS, names_filter=names)
    k0, k1 = base[names[0]], c[names[0]]
    torch.testing.assert_close(k1[:, :, 1], k0[:, :, 1] + u)
    assert torch.equal(k1[:, :, 0], k0[:, :, 0])
    s0, s1 = base[names[1]], c[names[1]]
    # KV head 1 serves query heads 2 and 3: their scores change, heads 0 and 1 do not.
    assert torch.equal(s0[:, :2], s1[:, :2])
    assert not torch.allclose(s0[:, 2:], s1[:, 2:])
    # ... but only by a per-row constant, which the softmax cancels.
    torch.testing.assert_close(c[names[2]], base[names[2]], atol=1e-5, rtol=1e-4)


def test_inject_gpt2_uses_hook_q_and_rotary_uses_rot_q(tiny_gpt2, tiny_llama):
    d2 = model_info(tiny_gpt2).d_head
    with inject_vectors(tiny_gpt2, {(0, 0): torch.ones(d2)}) as h:
        assert h.hook_names == ["blocks.0.attn.hook_q"]
    d = model_info(tiny_llama).d_head
    with inject_vectors(tiny_llama, {(0, 0): torch.ones(d)}) as h:
        assert h.hook_names == ["blocks.0.attn.hook_rot_q"]
    with inject_vectors(tiny_llama, {(0, 0): torch.ones(d)}, pre_rope=True) as h:
        assert h.hook_names == ["blocks.0.attn.hook_q"]
    with inject_vectors(tiny_llama, {(1, 1): torch.ones(d)}, site="key") as h:
        assert h.hook_names == ["blocks.1.attn.hook_rot_k"]


def test_inject_pre_rope_differs_from_post_rope(tiny_llama):
    d = model_info(tiny_llama).d_head
    vecs = {(0, 0): torch.randn(d) * 3, (1, 2): torch.randn(d) * 3}
    with inject_vectors(tiny_llama, vecs):
        post = tiny_llama(TOKENS)
    with inject_vectors(tiny_llama, vecs, pre_rope=True):
        pre = tiny_llama(TOKENS)
    assert not torch.allclose(pre, post, atol=1e-4)


def test_inject_validation(tiny_llama):
    d = model_info(tiny_llama).d_head
    with pytest.raises(ValueError, match="Unknown query head"):
        inject_vectors(tiny_llama, {(0, 4): torch.zeros(d)})
    with pytest.raises(ValueError, match="KV head"):
        inject_vectors(tiny_llama, {(0, 2): torch.zeros(d)}, site="key")  # only 2 KV heads
    with pytest.raises(ValueError, match=r"expected \(16,\)"):
        inject_vectors(tiny_llama, {(0, 0): torch.zeros(d + 1)})
    with pytest.raises(ValueError, match="NaN"):
        inject_vectors(tiny_llama, {(0, 0): torch.full((d,), float("nan"))})
    with pytest.raises(ValueError, match="non-empty"):
        inject_vectors(tiny_llama, {})
    with pytest.raises(ValueError, match="site"):
        inject_vectors(tiny_llama, {(0, 0): torch.zeros(d)}, site="value")
    assert count_hooks(tiny_llama) == 0
