"""focuslens.core.attention: the one definition of attention maths, checked against slow references and
against ``hook_pattern`` on every route that recomputes attention (scoring, directions, sink probe).

Architectures: tiny Gemma-3 (layer 0 slides over 8 keys, QK-norm, own scale; prompts are longer than
the window), tiny Llama (GQA), tiny GPT-2 (learned positions, hook_q/hook_k) and the real SmolLM2.
"""

from __future__ import annotations

import pytest
import torch

import focuslens.core.attention as fa
from focuslens.directions import FocusDirections, cache_qk, heldout_attention, make_direction_examples
from focuslens.directions import attention_mass
from focuslens.directions import objectives
from focuslens.directions.magnitude import _sink_curves
from focuslens.core.models import hook_name, model_info
from focuslens.score.contextual import qk_route_available, score_spans
from focuslens.testing import capital_example as _example, grab_hooks as _grab, pattern_mass as _pattern_mass

ATOL = 1e-5


# ------------------------------------------------------------------ slow references (explicit loops)


def _ref_visible(query_pos, n_keys, window=None, key_valid=None):
    out = torch.zeros(len(query_pos), n_keys, dtype=torch.bool)
    for r, t in enumerate(query_pos):
        for j in range(n_keys):
            ok = j <= t and (window is None or t - j < window)
            if key_valid is not None:
                ok = ok and bool(key_valid[j])
            out[r, j] = ok
    return out


def _ref_softmax(logits, visible):
    out = torch.zeros(logits.shape, dtype=torch.float64)
    flat_l, flat_v, flat_o = logits.reshape(-1, logits.shape[-1]), visible.reshape(-1, logits.shape[-1]), out.view(-1, logits.shape[-1])
    for i in range(flat_l.shape[0]):
        idx = [j for j in range(flat_l.shape[1]) if flat_v[i, j]]
        if not idx:
            continue
        m = max(float(flat_l[i, j]) for j in idx)
        z = sum(torch.exp(flat_l[i, j].double() - m) for j in idx)
        for j in idx:
            flat_o[i, j] = torch.exp(flat_l[i, j].double() - m) / z
    return out


@pytest.mark.parametrize("window", [None, 1, 3, 8])
def test_visible_keys_against_loops(window):
    qpos = [0, 2, 5, 9, 10]
    valid = torch.tensor([True, False] + [True] * 9)
    torch.testing.assert_close(fa.visible_keys(qpos, 11, sliding_window=window), _ref_visible(qpos, 11, window))
    got = fa.visible_keys(torch.tensor(qpos), 11, sliding_window=window, key_valid=valid)
    torch.testing.assert_close(got, _ref_visible(qpos, 11, window, valid))


@pytest.mark.parametrize("inplace", [False, True])
def test_row_softmax_against_loops(inplace):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 12, generator=g) * 5
    vis = torch.rand(3, 6, 12, generator=g) > 0.4
    vis[0, 2] = False  # an empty row: all zeros, no NaN
    vis[1, 3] = False
    vis[1, 3, 7] = True  # a single visible key: exactly 1
    logits[2, 0, 0] = float("-inf")  # -inf on an invisible or visible entry must not produce NaN
    vis[2, 0, 0] = False
    ref = _ref_softmax(logits, vis)
    got = fa.row_softmax(logits.clone(), vis, inplace=inplace)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=0)
    assert (got[~vis] == 0).all() and (got[0, 2] == 0).all() and got[1, 3, 7] == 1
    torch.testing.assert_close(fa.row_softmax(logits, torch.ones_like(vis)), torch.softmax(logits, -1))


def test_row_softmax_gradients_are_finite_with_empty_rows():
    x = torch.randn(2, 4, 5, requires_grad=True)
    vis = torch.ones(2, 4, 5, dtype=torch.bool)
    vis[1, 2] = False
    vis[0, :, 3:] = False
    p = fa.row_softmax(x, vis)
    (p * torch.arange(5.0)).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[1, 2] == 0).all() and (x.grad[0, :, 3:] == 0).all()


def test_soft_cap_and_bias_order():
    q, k = torch.randn(3, 4), torch.randn(6, 4)
    bias = torch.randn(1, 6)
    la = fa.LayerAttention(0, "", "", 0.5, sliding_window=2, softcap=1.5)
    ref_lg = torch.tanh((q @ k.T * 0.5 + bias) / 1.5) * 1.5
    torch.testing.assert_close(fa.attention_logits(q, k, scale=0.5, softcap=1.5, bias=bias), ref_lg)
    got = fa.attention_probs(q, k, la, [3, 4, 5], bias=bias)
    torch.testing.assert_close(got.double(), _ref_softmax(ref_lg, _ref_visible([3, 4, 5], 6, 2)), atol=1e-6, rtol=0)
    x = torch.randn(5)
    torch.testing.assert_close(fa.soft_cap(x.clone(), 2.0, inplace=True), fa.soft_cap(x, 2.0))


def test_expand_kv_order():
    x = torch.arange(2 * 3 * 2 * 1.0).reshape(2, 3, 2, 1)  # [b, p, G=2, d]
    y = fa.expand_kv(x, 4)
    assert y.shape == (2, 3, 4, 1) and torch.equal(y[:, :, 1], x[:, :, 0]) and torch.equal(y[:, :, 2], x[:, :, 1])
    with pytest.raises(ValueError, match="evenly"):
        fa.expand_kv(x, 3)


# ------------------------------------------------------------------------------ model facts


def test_layer_attention_on_gemma3(tiny_gemma3):
    la0, la1 = (fa.layer_attention(tiny_gemma3, l) for l in (0, 1))
    assert la0.sliding_window == 8 and la1.sliding_window is None
    assert la0.qk_norm and la0.exact and la0.q_hook == "blocks.0.attn.hook_rot_q"
    assert la0.scale == pytest.approx(16 ** -0.5)  # query_pre_attn_scalar=16
    assert qk_route_available(tiny_gemma3) == (True, "")


def test_module_attention_reads_hf_modules():
    from focuslens.testing import tiny_hf_model

    m = tiny_hf_model("gemma3")
    la = fa.module_attention(m.model.layers[0].self_attn, layer=0)
    assert (la.scale, la.sliding_window, la.softcap, la.exact) == (0.25, 8, None, True)
    assert fa.module_attention(m.model.layers[1].self_attn, layer=1, softcap=30.0).softcap == 30.0
    attn = m.model.layers[1].self_attn
    attn.sinks = torch.nn.Parameter(torch.zeros(4))
    assert not fa.module_attention(attn, layer=1).exact


@pytest.mark.parametrize("arch", ["tiny_gemma3", "tiny_llama", "tiny_gpt2"])
def test_scale_and_mask_rebuild_attention_scores_and_pattern(arch, request):
    """scale·q·k (+ soft-cap) equals hook_attn_scores on visible entries; attention_probs = hook_pattern."""
    model = request.getfixturevalue(arch)
    info = model_info(model)
    toks = torch.randint(3, 300, (1, 30), generator=torch.Generator().manual_seed(1))
    for l in range(info.n_layers):
        la = fa.layer_attention(model, l)
        st = _grab(model, toks, [la.q_hook, la.k_hook, hook_name(l, "hook_attn_scores"), hook_name(l, "hook_pattern")])
        q = st[la.q_hook].transpose(0, 1)  # [H, N, d]
        k = fa.expand_kv(st[la.k_hook], info.n_heads, head_dim=1).transpose(0, 1)
        vis = fa.visible_keys(range(30), 30, sliding_window=la.sliding_window)
        rebuilt = fa.attention_logits(q, k, scale=fa.attention_scale(model, l), softcap=la.softcap)
        torch.testing.assert_close(rebuilt[:, vis], st[hook_name(l, "hook_attn_scores")][:, vis].float(),
                                   atol=1e-5, rtol=1e-5)
        p = fa.attention_probs(q, k, la, range(30))
        diff = (p - st[hook_name(l, "hook_pattern")]).abs().max()
        assert diff < ATOL, (arch, l, float(diff))


# ------------------------------------------------------------- the directions code vs hook_pattern


def _directions(model, heads, seed=0, std=1.0):
    info = model_info(model)
    g = torch.Generator().manual_seed(seed)
    return FocusDirections(heads=heads, vectors=torch.randn(len(heads), info.d_head, generator=g) * std,
                           fingerprint=info.fingerprint(), site=fa.query_site(model))


def _check_directions_parity(model, dx, heads, *, alphas=(0.8, -1.2), report=None):
    """cache_qk + heldout_attention / attention_mass, _live_forward and _sink_curves = hook_pattern."""
    worst = 0.0

    def close(a, b):
        nonlocal worst
        worst = max(worst, float((a - b).abs().max()))
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)

    cache = cache_qk(model, dx, heads)
    close(heldout_attention(cache, None), _pattern_mass(model, dx, heads))
    close(heldout_attention(cache, None, column="sink"), _pattern_mass(model, dx, heads, column="sink"))
    d = _directions(model, heads)
    # the cached objective uses clean q/k: exact when only the head's own layer is steered
    for layer in sorted({l for l, _ in heads}):
        sel = [h for h in heads if h[0] == layer]
        idx = [heads.index(h) for h in sel]
        for alpha in alphas:
            truth = _pattern_mass(model, dx, sel, d.select(sel), alpha)
            close(heldout_attention(cache, d, alpha=alpha)[idx], truth)
            # the per-example function (the per-layer trainer's) agrees with the batched one
            u = alpha * d.select(sel).vectors.float()
            per = torch.stack([attention_mass(cache.logits0[i][idx], cache.keys[i][cache.kv_index[idx]],
                                              cache.relevant[i], u, scale=cache.head_scale[idx],
                                              visible=cache.visible[i][idx], softcap=cache.softcap)
                               for i in range(len(cache))]).mean(0)
            close(per, truth)
    # live objective: all heads steered at once, gradients on
    alpha = alphas[0]
    u = d.vectors.clone().requires_grad_(True)
    live = torch.stack([objectives._live_forward(model, ex, heads, u, alpha, want_attention=True)[1] for ex in dx]).mean(0)
    close(live.detach(), _pattern_mass(model, dx, heads, d, alpha))
    live.sum().backward()
    assert torch.isfinite(u.grad).all() and u.grad.abs().max() > 0
    # sink probe: last 3 prompt rows, each layer steered on its own
    p = dx[0].prompt
    toks = p.tokens[: p.response.start]
    n = len(toks)
    alph = torch.tensor([0.0, alphas[0], alphas[1]])
    curves = _sink_curves(model, d, toks, alph, rows=3)  # [S, A]
    for layer in sorted({l for l, _ in heads}):
        sel = [h for h in heads if h[0] == layer]
        for a_i, a in enumerate(alph.tolist()):
            handle = d.select(sel).apply(model, alpha=a)
            try:
                st = _grab(model, toks[None], [hook_name(layer, "hook_pattern")])
            finally:
                handle.remove()
            for l, h in sel:
                truth = st[hook_name(layer, "hook_pattern")][h, n - 3:, 0].mean()
                close(curves[heads.index((l, h)), a_i], truth)
    if report is not None:
        report.append((model_info(model).name, worst))
    return cache


@pytest.fixture(scope="module")
def parity_report():
    out: list[tuple[str, float]] = []
    yield out
    print("\nmax |directions - hook_pattern|: " + ", ".join(f"{n} {w:.1e}" for n, w in out))


@pytest.mark.parametrize("arch", ["tiny_gemma3", "tiny_llama", "tiny_gpt2"])
def test_directions_masses_equal_hook_pattern(arch, request, parity_report):
    model = request.getfixturevalue(arch)
    dx = make_direction_examples(model, [_example(i) for i in range(4)],
                                 responses=[f"The capital is {chr(66 + i % 3)}." for i in range(4)])
    heads = [(1, 2), (0, 1), (1, 3), (0, 0)]
    cache = _check_directions_parity(model, dx, heads, report=parity_report)
    if arch == "tiny_gemma3":
        assert min(len(ex.prompt) for ex in dx) > 3 * 8  # prompts far longer than the window
        assert cache.layers[0].sliding_window == 8 and cache.layers[1].sliding_window is None
        # the window really hides the relevant document from layer 0's response rows
        assert all(not v[heads.index((0, 1))].all(-1).any() for v in cache.visible)
        assert heldout_attention(cache, None)[heads.index((0, 1))] == 0


def test_directions_masses_equal_hook_pattern_smollm(smollm, parity_report):
    dx = make_direction_examples(smollm, [_example(i) for i in range(2)],
                                 responses=["The capital is B0.", "The capital is C1."])
    _check_directions_parity(smollm, dx, [(3, 1), (12, 4), (12, 5)], alphas=(0.5, -0.5), report=parity_report)


def test_qk_scoring_equals_pattern_on_gemma3(tiny_gemma3):
    toks = torch.randint(3, 300, (36,), generator=torch.Generator().manual_seed(5))
    kw = dict(response=(28, 36), spans={"relevant": (2, 14)}, distractors=[(14, 22)])
    a, b = score_spans(tiny_gemma3, toks, method="qk", **kw), score_spans(tiny_gemma3, toks, method="pattern", **kw)
    torch.testing.assert_close(a.columns, b.columns, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------ refusals


def test_cache_qk_refuses_inexact_models(tiny_llama, monkeypatch):
    dx = make_direction_examples(tiny_llama, [_example(0)], responses=["The capital is B0."])
    real = fa.layer_attention

    def fake(model, layer):
        la = real(model, layer)
        return la if layer == 0 else fa.LayerAttention(**{**la.__dict__, "exact": False, "why": "layer 1: test reason"})

    monkeypatch.setattr(fa, "layer_attention", fake)
    with pytest.raises(ValueError, match="cache_qk.*not exact on this model .layer 1: test reason"):
        cache_qk(tiny_llama, dx, [(1, 0)])
    cache_qk(tiny_llama, dx, [(0, 0)])  # only the layers used are checked
    u = torch.zeros(1, 16)
    with pytest.raises(ValueError, match="test reason"):
        objectives._live_forward(tiny_llama, dx[0], [(1, 0)], u, 1.0, want_attention=True)
    objectives._live_forward(tiny_llama, dx[0], [(1, 0)], u, 1.0, want_attention=False)  # NLL only: fine


def test_cache_qk_refuses_attention_sinks(tiny_llama):
    """A real inexact case: learned attention sinks (GPT-OSS style) on the wrapped HF module."""
    dx = make_direction_examples(tiny_llama, [_example(0)], responses=["The capital is B0."])
    hf = tiny_llama.blocks[1].attn.original_component
    try:
        hf.sinks = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
        with pytest.raises(ValueError, match="sinks"):
            cache_qk(tiny_llama, dx, [(1, 0)])
        with pytest.raises(ValueError, match="sinks"):
            _sink_curves(tiny_llama, _directions(tiny_llama, [(1, 0)]), dx[0].prompt.tokens, torch.zeros(1))
    finally:
        del hf.sinks
