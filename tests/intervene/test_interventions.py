"""Interventions: exact identities, independent references (HF eager attention re-implemented by
hand), KV-cache generation, other heads untouched, composition and leak-freedom under faults."""

from __future__ import annotations

import contextlib
import importlib
from unittest import mock

import pytest
import torch

from focuslens.core.hooks import attach_hooks, count_hooks
from focuslens.intervene.eager import compose, inject_vectors, split_softmax, split_softmax_pattern
from focuslens.core.models import hook_name, model_info
from focuslens.core.prompts import Span
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


def _generate_logits(model, tokens, n):
    return model.generate(
        tokens, max_new_tokens=n, do_sample=False, verbose=False, use_past_kv_cache=True,
        stop_at_eos=False, output_logits=True,
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
        assert h.n_hooks == 4  # per edited layer: the edit, and the finiteness check of the heads' output
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


# --------------------------------------------------------------------------------------------------
# split_softmax
# --------------------------------------------------------------------------------------------------

SPLIT_HEADS = [(0, 1), (1, 0), (1, 3)]


def _mask_fn(spans):
    def fn(k):
        m = torch.zeros(k, dtype=torch.bool)
        for s in spans:
            m[s.start:s.end] = True
        return m

    return fn


def test_split_tau_one_is_exact_identity(tiny_any):
    base = tiny_any(TOKENS)
    with split_softmax(tiny_any, SPLIT_HEADS, SPAN, 1.0):
        out = tiny_any(TOKENS)
    assert torch.equal(out, base)


@pytest.mark.parametrize("tau", [0.2, 2.5])
def test_split_matches_hf_reference_prefill(tiny_any, tau):
    arch = _arch(tiny_any)
    spans = [Span(2, 5), Span(8, 11)]
    with hf_reference(arch, pattern_edit=_ref_split(SPLIT_HEADS, _mask_fn(spans), tau)) as hf:
        ref = hf(TOKENS).logits
    base = tiny_any(TOKENS)
    with split_softmax(tiny_any, SPLIT_HEADS, spans, tau):
        out = tiny_any(TOKENS)
    assert (out - base).abs().max() > 1e-2, "split softmax must change the logits"
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch_fixture", ["tiny_llama", "tiny_gpt2"])
def test_split_cached_generation_matches_full_forward_and_hf(arch_fixture, request):
    model = request.getfixturevalue(arch_fixture)
    arch = _arch(model)
    tau = 0.1
    heads = [(0, 0), (0, 2), (1, 1), (1, 2)]
    with hf_reference(arch, pattern_edit=_ref_split(heads, _mask_fn([SPAN]), tau)) as hf:
        ref_seq, ref_logits = _hf_greedy(hf, TOKENS, 8)
    plain = _generate_logits(model, TOKENS, 8)
    with split_softmax(model, heads, SPAN, tau):
        gen = _generate_logits(model, TOKENS, 8)
        full = _bridge_greedy_full(model, TOKENS, 8)
    assert torch.equal(gen.sequences, full)
    assert torch.equal(gen.sequences, ref_seq[:, : full.shape[1]])
    # per-step logits of the cached decoding equal the HF reference's cached decoding
    steps = torch.stack(gen.logits, 1)
    torch.testing.assert_close(steps, ref_logits[:, : steps.shape[1]], atol=2e-5, rtol=1e-5)
    assert (steps - torch.stack(plain.logits, 1)).abs().amax(-1).min() > 1e-3, (
        "every decoding step must be edited"
    )


def test_split_pattern_properties_and_other_heads(tiny_llama):
    tau = 0.3
    names = [hook_name(1, "hook_pattern"), hook_name(1, "hook_z"), hook_name(0, "hook_z")]
    _, base = tiny_llama.run_with_cache(TOKENS, names_filter=names)
    with split_softmax(tiny_llama, [(1, 2)], SPAN, tau):
        _, c = tiny_llama.run_with_cache(TOKENS, names_filter=names)
    p0, p1 = base[names[0]][0], c[names[0]][0]  # [H, q, k]
    assert torch.equal(c[names[2]], base[names[2]]), "an earlier layer must not change"
    for h in range(4):
        assert torch.equal(c[names[1]][:, :, h], base[names[1]][:, :, h]) == (h != 2)
        assert torch.equal(p1[h], p0[h]) == (h != 2)
    a0, a1 = p0[2].double(), p1[2].double()
    # rows that cannot see the span are untouched, bit for bit
    assert torch.equal(a1[: SPAN.start], a0[: SPAN.start].to(a1.dtype))
    rows = slice(SPAN.start, None)
    torch.testing.assert_close(a1[rows].sum(-1), torch.ones_like(a1[rows, 0]), atol=1e-6, rtol=0)
    pi0 = a0[rows, SPAN.slice].sum(-1)
    pi1 = a1[rows, SPAN.slice].sum(-1)
    torch.testing.assert_close(pi1, pi0**tau, atol=1e-6, rtol=1e-5)
    assert (pi1 > pi0).all()
    # proportions inside C and outside C are kept
    t = TOKENS.shape[1] - 1
    inside0 = a0[t, SPAN.slice] / a0[t, SPAN.slice].sum()
    inside1 = a1[t, SPAN.slice] / a1[t, SPAN.slice].sum()
    torch.testing.assert_close(inside1, inside0, atol=1e-6, rtol=1e-5)
    out_idx = torch.ones(a0.shape[-1], dtype=torch.bool)
    out_idx[SPAN.slice] = False
    torch.testing.assert_close(
        a1[t, out_idx] / a1[t, out_idx].sum(), a0[t, out_idx] / a0[t, out_idx].sum(), atol=1e-6, rtol=1e-5
    )


def test_split_softmax_pattern_guards():
    m = torch.tensor([False, True, True, False])
    pat = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],  # pi = 0: untouched
            [0.0, 0.5, 0.5, 0.0],  # pi = 1: untouched
            [0.25, 0.25, 0.25, 0.25],
            [1e-9, 0.5, 0.5 - 2e-9, 1e-9],  # pi close to 1: finite, mass kept
        ]
    )
    out = split_softmax_pattern(pat, m, 0.5)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], pat[0]) and torch.equal(out[1], pat[1])
    torch.testing.assert_close(out[2, 1:3].sum(), torch.tensor(0.5**0.5))
    torch.testing.assert_close(out.sum(-1), pat.sum(-1))
    # near 1: (1 - p^tau)/(1 - p) -> tau, so the outside entries are scaled by ~0.5
    torch.testing.assert_close(out[3, [0, 3]], pat[3, [0, 3]] * 0.5, rtol=1e-3, atol=0)
    # the absolute-position guard
    out = split_softmax_pattern(pat[2:3], m, 0.5, query_positions=torch.tensor([2]), min_query=3)
    assert torch.equal(out, pat[2:3])


def test_split_validation(tiny_llama):
    for bad in (0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tau must be > 0"):
            split_softmax(tiny_llama, [(0, 0)], SPAN, bad)
    with pytest.raises(ValueError, match="Unknown head"):
        split_softmax(tiny_llama, [(2, 0)], SPAN, 0.5)
    with pytest.raises(ValueError, match="empty"):
        split_softmax(tiny_llama, [(0, 0)], Span(3, 3), 0.5)
    with pytest.raises(ValueError, match="at least one"):
        split_softmax(tiny_llama, [], SPAN, 0.5)
    with pytest.raises(ValueError, match="reaches outside"):
        split_softmax(tiny_llama, [(0, 0)], SPAN, 0.5, seq_len=6)
    assert count_hooks(tiny_llama) == 0


# --------------------------------------------------------------------------------------------------
# Composition and hygiene (fault injection)
# --------------------------------------------------------------------------------------------------


def test_compose_equals_nesting(tiny_llama):
    d = model_info(tiny_llama).d_head
    vecs = {(0, 3): torch.randn(d) * 2}
    with split_softmax(tiny_llama, [(1, 1)], SPAN, 0.3), inject_vectors(tiny_llama, vecs):
        nested = tiny_llama(TOKENS)
    h = compose(split_softmax(tiny_llama, [(1, 1)], SPAN, 0.3), inject_vectors(tiny_llama, vecs))
    with h:
        assert h.n_hooks == 3 and h.active  # split softmax 1, injection 2 (edit + output check)
        composed = tiny_llama(TOKENS)
    assert not h.active
    assert torch.equal(nested, composed)
    with split_softmax(tiny_llama, [(1, 1)], SPAN, 0.3):
        only_split = tiny_llama(TOKENS)
    assert not torch.allclose(only_split, composed)


def test_span_past_sequence_raises_in_forward_and_leaves_nothing(tiny_llama):
    base = tiny_llama(TOKENS)
    with pytest.raises(ValueError, match="reach past the sequence"):
        with split_softmax(tiny_llama, [(0, 0)], Span(10, 40), 0.5):
            tiny_llama(TOKENS)
    assert count_hooks(tiny_llama) == 0
    assert torch.equal(tiny_llama(TOKENS), base)


def test_fault_injection_leaves_model_clean(tiny_llama):
    base = tiny_llama(TOKENS)
    base_gen = _generate(tiny_llama, TOKENS, 5)
    d = model_info(tiny_llama).d_head
    vecs = {(0, 1): torch.randn(d), (1, 2): torch.randn(d)}

    # 1. exception raised inside the context
    with pytest.raises(RuntimeError, match="boom"):
        with compose(split_softmax(tiny_llama, [(0, 0)], SPAN, 0.2), inject_vectors(tiny_llama, vecs)):
            tiny_llama(TOKENS)
            raise RuntimeError("boom")
    assert count_hooks(tiny_llama) == 0

    # 2. exception raised inside a hook during generation, with other interventions attached
    def bad_hook(x, hook):
        raise KeyError("hook failure")

    with pytest.raises(KeyError, match="hook failure"):
        with split_softmax(tiny_llama, [(1, 0)], SPAN, 0.2), inject_vectors(tiny_llama, vecs):
            with attach_hooks(tiny_llama, [(hook_name(1, "hook_z"), bad_hook)]):
                _generate(tiny_llama, TOKENS, 3)
    assert count_hooks(tiny_llama) == 0

    # 3. a handle removed by hand, twice; afterwards forward and generation are bit-identical
    h = split_softmax(tiny_llama, [(0, 0)], SPAN, 0.2)
    h.remove()
    h.remove()
    assert count_hooks(tiny_llama) == 0
    assert torch.equal(tiny_llama(TOKENS), base)
    assert torch.equal(_generate(tiny_llama, TOKENS, 5), base_gen)


def test_compose_removes_all_even_if_one_remove_fails(tiny_llama):
    a = split_softmax(tiny_llama, [(0, 0)], SPAN, 0.2)
    b = split_softmax(tiny_llama, [(1, 0)], SPAN, 0.2)

    orig = b.remove

    def failing_remove():
        orig()
        raise RuntimeError("remove failed")

    b.remove = failing_remove
    with pytest.raises(RuntimeError, match="remove failed"):
        compose(a, b).remove()
    assert count_hooks(tiny_llama) == 0


def test_compose_refusing_its_arguments_leaves_no_hooks(tiny_llama, tiny_llama_mha):
    """compose() removes the handles it was given before it raises (the caller gets nothing to remove)."""
    d = model_info(tiny_llama).d_head
    # A non-handle among the arguments.
    a = split_softmax(tiny_llama, [(0, 0)], SPAN, 0.2)
    b = inject_vectors(tiny_llama, {(1, 1): torch.randn(d)})
    with pytest.raises(TypeError, match="HookHandle.*removed"):
        compose(a, "not a handle", b)
    assert count_hooks(tiny_llama) == 0 and not a.active and not b.active
    # Handles of two different models.
    a = split_softmax(tiny_llama, [(0, 0)], SPAN, 0.2)
    c = split_softmax(tiny_llama_mha, [(1, 0)], SPAN, 0.2)
    with pytest.raises(ValueError, match="same model"):
        compose(a, c)
    assert count_hooks(tiny_llama) == 0 and count_hooks(tiny_llama_mha) == 0


def test_compose_of_specs_when_an_argument_fails(tiny_llama):
    """The eager form cannot help when an argument raises (the first handle is already attached when
    the second call fails); the spec form attaches all-or-nothing."""
    from focuslens.intervene.vector_specs import InjectVectors
    from focuslens.intervene.span_specs import SplitSoftmax

    d = model_info(tiny_llama).d_head
    with pytest.raises(ValueError, match="finite"):
        InjectVectors({(0, 1): torch.randn(d)}, alpha=float("nan"))  # refused before any hook exists
    spec = SplitSoftmax([(0, 0)], 0.2, span=SPAN) + InjectVectors({(5, 1): torch.randn(d)})
    with pytest.raises(ValueError, match="Unknown query head"):
        with spec.attach(tiny_llama):
            pass
    assert count_hooks(tiny_llama) == 0


def test_split_and_inject_in_manual_cache_loop(tiny_llama):
    """The decoding loop of focuslens.evaluation.runner (forward with past_key_values) is edited exactly."""
    d = model_info(tiny_llama).d_head
    vecs = {(0, 3): torch.randn(d, generator=torch.Generator().manual_seed(5)) * 3}
    with split_softmax(tiny_llama, [(0, 1), (1, 2)], SPAN, 0.1), inject_vectors(tiny_llama, vecs):
        logits, cache = tiny_llama(TOKENS, return_type="logits_and_cache")
        seq = TOKENS
        for _ in range(5):
            nxt = logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], 1)
            logits, cache = tiny_llama(nxt, return_type="logits_and_cache", past_key_values=cache)
        full = tiny_llama(seq)[:, -1]
    torch.testing.assert_close(logits[:, -1], full, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(full, tiny_llama(seq)[:, -1], atol=1e-4)


# --------------------------------------------------------------------------------------------------
# The single-example path is bit-identical to the original definition; PASTA
# --------------------------------------------------------------------------------------------------


def _split_softmax_pattern_original(pattern, key_mask, tau, *, query_positions=None, min_query=0):
    """The single-example ``split_softmax_pattern`` as it was before per-row masks (frozen copy)."""
    m = key_mask.to(device=pattern.device, dtype=torch.bool)
    mf = m.to(pattern.dtype)
    pi = (pattern @ mf).double()
    rho = (pattern @ (1 - mf)).double()
    total = pi + rho
    ok = (pi > 0) & (rho > 0)
    if query_positions is not None:
        ok = ok & (query_positions.to(pattern.device) >= min_query)
    safe_total = torch.where(ok, total, torch.ones_like(total))
    logp = torch.log(torch.where(ok, pi, 0.5 * safe_total) / safe_total)
    scale_c = torch.exp((tau - 1.0) * logp)
    scale_r = -torch.expm1(tau * logp) * safe_total / torch.where(ok, rho, safe_total)
    one = torch.ones_like(scale_c)
    scale_c = torch.where(ok, scale_c, one).to(pattern.dtype).unsqueeze(-1)
    scale_r = torch.where(ok, scale_r, one).to(pattern.dtype).unsqueeze(-1)
    return pattern * torch.where(m, scale_c, scale_r)


def test_single_example_split_softmax_pattern_is_bit_identical_to_the_original():
    g = torch.Generator().manual_seed(3)
    pat = torch.softmax(torch.randn(2, 3, 7, 12, generator=g) * 3, -1)
    m = torch.zeros(12, dtype=torch.bool)
    m[3:6] = True
    for tau, qpos, mq in ((0.2, None, 0), (2.5, None, 0), (0.3, torch.arange(5, 12), 8)):
        a = split_softmax_pattern(pat, m, tau, query_positions=qpos, min_query=mq)
        b = _split_softmax_pattern_original(pat, m, tau, query_positions=qpos, min_query=mq)
        assert torch.equal(a, b)


def test_per_row_masks_equal_row_by_row():
    g = torch.Generator().manual_seed(4)
    pat = torch.softmax(torch.randn(3, 2, 5, 9, generator=g) * 2, -1)
    masks = torch.zeros(3, 9, dtype=torch.bool)
    masks[0, 1:3], masks[1, 4:8], masks[2, 0:1] = True, True, True
    mq = torch.tensor([0, 6, 7])
    qpos = torch.arange(4, 9)
    from focuslens.intervene.eager import pasta_pattern

    for fn, s in ((split_softmax_pattern, 0.3), (pasta_pattern, 0.05)):
        got = fn(pat, masks, s, query_positions=qpos, min_query=mq)
        for b in range(3):
            want = fn(pat[b], masks[b], s, query_positions=qpos, min_query=int(mq[b]))
            torch.testing.assert_close(got[b], want, atol=1e-7, rtol=1e-6)
    with pytest.raises(ValueError, match="per-row key mask"):
        split_softmax_pattern(pat[:2], masks, 0.5)


def test_pasta_pattern_is_the_log_coefficient_score_shift():
    """PASTA's implementation adds log(coefficient) to the scores outside C; the pattern edit is the same."""
    from focuslens.intervene.eager import pasta_pattern

    g = torch.Generator().manual_seed(5)
    scores = torch.randn(4, 6, 10, generator=g, dtype=torch.float64) * 2
    m = torch.zeros(10, dtype=torch.bool)
    m[2:5] = True
    for c in (0.01, 0.3, 4.0):
        want = torch.softmax(scores + torch.where(m, 0.0, torch.log(torch.tensor(c, dtype=torch.float64))), -1)
        got = pasta_pattern(torch.softmax(scores, -1), m, c)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    # guards: rows with no mass on C or nothing outside C are unchanged; coefficient 1 is the identity
    pat = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    mk = torch.tensor([False, True, True, False])
    out = pasta_pattern(pat, mk, 0.01)
    assert torch.equal(out[:2], pat[:2])
    torch.testing.assert_close(out[2, 1:3].sum(), torch.tensor(0.5 / (0.5 + 0.01 * 0.5)))
    torch.testing.assert_close(pasta_pattern(pat, mk, 1.0), pat)


def test_pasta_hook_matches_the_formula_and_is_exact_identity_at_one(tiny_llama):
    from focuslens.intervene.eager import pasta

    name = hook_name(1, "hook_pattern")
    logits, base = tiny_llama.run_with_cache(TOKENS, names_filter=[name])
    with pasta(tiny_llama, [(1, 1)], SPAN, 1.0):
        assert torch.equal(tiny_llama(TOKENS), logits)
    with pasta(tiny_llama, [(1, 1)], SPAN, 0.01):
        assert (tiny_llama(TOKENS) - logits).abs().max() > 1e-3, "PASTA must change the logits"
    with pasta(tiny_llama, [(1, 1)], SPAN, 0.01):
        _, c = tiny_llama.run_with_cache(TOKENS, names_filter=[name])
    a0, a1 = base[name][0].double(), c[name][0].double()
    for h in (0, 2, 3):
        assert torch.equal(c[name][0, h], base[name][0, h])
    assert torch.equal(a1[1, : SPAN.start], a0[1, : SPAN.start])  # rows that cannot see the span
    for t in range(SPAN.start, TOKENS.shape[1]):
        row = a0[1, t]
        pi = row[SPAN.slice].sum()
        z = pi + 0.01 * (row.sum() - pi)
        want = row * 0.01 / z
        want[SPAN.slice] = row[SPAN.slice] / z
        torch.testing.assert_close(a1[1, t], want, atol=1e-6, rtol=1e-5)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="coefficient must be > 0"):
            pasta(tiny_llama, [(1, 1)], SPAN, bad)
    assert count_hooks(tiny_llama) == 0
