"""Attribution patching against slow references: the first-order Taylor term per head (one backward per
head through a scalar interpolation), finite differences, and for AtP*'s QK fix the model's own
patched attention pattern; shapes, GQA, identity, no hooks or gradients left behind."""

from __future__ import annotations

import pytest
import torch

from focuslens.heads.attribution import attribution_patch_heads, attribution_patch_sites
from focuslens.core.hooks import count_hooks
from focuslens.core.models import hook_name, model_info

CLEAN = torch.tensor([[0, 5, 17, 33, 8, 91, 120, 44, 7, 60, 250, 13]])
CORRUPT = torch.tensor([[0, 5, 17, 33, 8, 200, 121, 44, 7, 60, 250, 13]])
HOOK = {"z": "hook_z", "q": "hook_q", "k": "hook_k", "v": "hook_v", "pattern": "hook_pattern"}


def metric_fn(logits):
    return (logits[:, -1, 3] - logits[:, -1, 9]).mean()


def _select(site, shape, h, p):
    """Bool mask of one head (one position / query row) of a site activation."""
    m = torch.zeros(shape, dtype=torch.bool)
    if site == "pattern":  # [b, head, q, k]
        if p is None:
            m[:, h] = True
        else:
            m[:, h, p] = True
    else:  # [b, pos, slot, d]
        if p is None:
            m[:, :, h] = True
        else:
            m[:, p, h] = True
    return m


def _taylor(model, name, target, mask, corrupted=CORRUPT):
    """d/dε metric(corrupted run with act ← act + ε·mask·(target − act)) at ε = 0 (one backward)."""
    eps = torch.zeros((), requires_grad=True)

    def hook(x, hook=None):
        return x + eps * mask * (target - x.detach())

    with torch.enable_grad(), model.hooks(fwd_hooks=[(name, hook)]):
        m = metric_fn(model(corrupted))
    (g,) = torch.autograd.grad(m, [eps])
    return float(g)


def _cache(model, tokens, names):
    with torch.no_grad():
        _, c = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {n: c[n].clone() for n in names}


@pytest.mark.parametrize("site", ["z", "q", "k", "v", "pattern"])
@pytest.mark.parametrize("per_position", [False, True])
def test_plain_atp_equals_per_head_taylor_term(tiny_llama, site, per_position):
    model = tiny_llama
    info = model_info(model)
    est = attribution_patch_heads(model, CORRUPT, CLEAN, metric_fn, site=site, per_position=per_position, qk_fix=False)
    with torch.no_grad():
        base = float(metric_fn(model(CORRUPT)))
    slots = info.n_kv_heads if site in ("k", "v") else info.n_heads
    assert est.shape == ((info.n_layers, CLEAN.shape[1], slots) if per_position else (info.n_layers, slots))
    names = [hook_name(l, HOOK[site]) for l in range(info.n_layers)]
    clean = _cache(model, CLEAN, names)
    positions = [5, 6, 11] if per_position else [None]
    moved = 0
    for l in range(info.n_layers):
        for h in range(slots):
            for p in positions:
                ref = _taylor(model, names[l], clean[names[l]], _select(site, clean[names[l]].shape, h, p))
                got = float(est[l, h] if p is None else est[l, p, h]) - base
                assert got == pytest.approx(ref, abs=1e-5, rel=1e-4), (l, h, p)
                moved += abs(ref) > 1e-4
    assert moved > 0, "the corrupted tokens must have a first-order effect somewhere"


def test_taylor_term_matches_finite_differences(tiny_llama):
    """The reference itself: the gradient is the slope of the interpolated run (central differences)."""
    model = tiny_llama
    name = hook_name(1, "hook_z")
    clean = _cache(model, CLEAN, [name])[name]
    corr = _cache(model, CORRUPT, [name])[name]
    mask = _select("z", clean.shape, 2, None)
    est = attribution_patch_heads(model, CORRUPT, CLEAN, metric_fn, site="z")
    with torch.no_grad():
        base = float(metric_fn(model(CORRUPT)))

    def at(e):
        def hook(x, hook=None):
            return torch.where(mask, corr + e * (clean - corr), x)

        with torch.no_grad(), model.hooks(fwd_hooks=[(name, hook)]):
            return float(metric_fn(model(CORRUPT)))

    e = 1e-2
    fd = (at(e) - at(-e)) / (2 * e)
    assert abs(fd) > 1e-3
    assert float(est[1, 2]) - base == pytest.approx(fd, rel=2e-2, abs=1e-4)


def _model_pattern_after(model, layer, site, h, p, clean):
    """hook_pattern of ``layer`` in the corrupted run with q/k head ``h`` (position ``p``) patched by the model."""
    qk = hook_name(layer, HOOK[site])
    pat = hook_name(layer, "hook_pattern")
    store = {}
    mask = _select(site, clean[qk].shape, h, p)

    def patch(x, hook=None):
        return torch.where(mask, clean[qk], x)

    def keep(x, hook=None):
        store["a"] = x.detach().clone()

    with torch.no_grad(), model.hooks(fwd_hooks=[(qk, patch), (pat, keep)]):
        model(CORRUPT)
    return store["a"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("site", ["q", "k"])
@pytest.mark.parametrize("per_position", [False, True])
def test_qk_fix_equals_linearisation_at_the_exact_patched_pattern(arch, site, per_position, request):
    """AtP*: (A' − A)·∂m/∂A with A' the pattern the model itself computes after the q/k patch."""
    model = request.getfixturevalue(f"tiny_{arch}")
    info = model_info(model)
    est = attribution_patch_heads(model, CORRUPT, CLEAN, metric_fn, site=site, per_position=per_position)
    with torch.no_grad():
        base = float(metric_fn(model(CORRUPT)))
    names = [hook_name(l, HOOK[site]) for l in range(info.n_layers)]
    clean = _cache(model, CLEAN, names)
    corr_pat = _cache(model, CORRUPT, [hook_name(l, "hook_pattern") for l in range(info.n_layers)])
    slots = info.n_kv_heads if site == "k" else info.n_heads
    positions = [5, 7, 11] if per_position else [None]
    moved = 0
    for l in range(info.n_layers):
        pat = hook_name(l, "hook_pattern")
        for h in range(slots):
            for p in positions:
                a_new = _model_pattern_after(model, l, site, h, p, clean)
                ref = _taylor(model, pat, a_new, torch.ones_like(a_new, dtype=torch.bool))
                got = float(est[l, h] if p is None else est[l, p, h]) - base
                assert got == pytest.approx(ref, abs=2e-5, rel=1e-4), (l, h, p)
                moved += abs(ref) > 1e-4
                assert not torch.equal(a_new, corr_pat[pat]) or abs(ref) < 1e-7
    assert moved > 0


def test_qk_fix_differs_from_plain_atp_and_q_rows_add_up(tiny_llama):
    fixed = attribution_patch_sites(tiny_llama, CORRUPT, CLEAN, metric_fn, sites=["q", "k"])
    plain = attribution_patch_sites(tiny_llama, CORRUPT, CLEAN, metric_fn, sites=["q", "k"], qk_fix=False)
    for s in ("q", "k"):
        assert (fixed[s] - plain[s]).abs().max() > 1e-6, "the softmax is not linear: the fix must change something"
    rows = attribution_patch_heads(tiny_llama, CORRUPT, CLEAN, metric_fn, site="q", per_position=True)
    with torch.no_grad():
        base = float(metric_fn(tiny_llama(CORRUPT)))
    # a query row only changes its own row of the pattern: per-row effects add up to the all-row effect
    torch.testing.assert_close((rows - base).sum(1) + base, fixed["q"], atol=1e-5, rtol=1e-5)


def test_sites_at_once_equal_one_by_one_and_identity(tiny_llama):
    all_sites = attribution_patch_sites(tiny_llama, CORRUPT, CLEAN, metric_fn)
    for s, r in all_sites.items():
        one = attribution_patch_heads(tiny_llama, CORRUPT, CLEAN, metric_fn, site=s)
        torch.testing.assert_close(r, one, atol=1e-6, rtol=1e-6)
    same = attribution_patch_sites(tiny_llama, CORRUPT, CORRUPT, metric_fn, per_position=True)
    with torch.no_grad():
        base = float(metric_fn(tiny_llama(CORRUPT)))
    for s, r in same.items():
        assert torch.all(r == base), s
    part = attribution_patch_heads(tiny_llama, CORRUPT, CLEAN, metric_fn, site="v", layers=[1])
    assert part.shape == (2, model_info(tiny_llama).n_kv_heads)
    assert torch.isnan(part[0]).all() and not torch.isnan(part[1]).any()


def test_no_hooks_no_gradients_left_also_after_an_error(tiny_llama):
    params = list(tiny_llama.parameters())
    flags = [p.requires_grad for p in params]
    params[0].requires_grad_(not flags[0])  # a mixed state must come back as it was
    before = [p.requires_grad for p in params]
    attribution_patch_sites(tiny_llama, CORRUPT, CLEAN, metric_fn)
    assert [p.requires_grad for p in params] == before
    assert all(p.grad is None for p in params)
    assert count_hooks(tiny_llama) == 0

    def boom(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        attribution_patch_heads(tiny_llama, CORRUPT, CLEAN, boom)
    assert [p.requires_grad for p in params] == before and count_hooks(tiny_llama) == 0
    params[0].requires_grad_(flags[0])


def test_validation(tiny_llama):
    with pytest.raises(ValueError, match="Unknown site"):
        attribution_patch_heads(tiny_llama, CORRUPT, CLEAN, metric_fn, site="resid")
    with pytest.raises(ValueError, match="same shape"):
        attribution_patch_heads(tiny_llama, CORRUPT, CLEAN[:, :-1], metric_fn)
    with pytest.raises(ValueError, match="Unknown layer"):
        attribution_patch_heads(tiny_llama, CORRUPT, CLEAN, metric_fn, layers=[7])
    with pytest.raises(ValueError, match="differentiable scalar"):
        attribution_patch_heads(tiny_llama, CORRUPT, CLEAN, lambda lg: metric_fn(lg).detach())
    with pytest.raises(ValueError, match="differentiable scalar"):
        attribution_patch_heads(tiny_llama, CORRUPT, CLEAN, lambda lg: lg[0, -1, :2])
    with pytest.raises(ValueError, match="differentiable scalar"):
        attribution_patch_heads(tiny_llama, CORRUPT, CLEAN, lambda lg: 1.0)
    assert count_hooks(tiny_llama) == 0
