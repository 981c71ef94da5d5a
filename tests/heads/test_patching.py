"""Activation patching and ablation: identities, equivalence with hand-written hooks, GQA KV-head axes,
independent references for ablation (HF weights edited), equal-length pairs on the real tokenizer."""

from __future__ import annotations

import pytest
import torch

from focuslens.core.hooks import count_hooks
from focuslens.core.models import hook_name, model_info
from focuslens.heads.patching import (
    ablate_heads,
    cache_sites,
    head_means,
    logit_diff_metric,
    make_corrupted_pair,
    patch_heads,
)
from focuslens.testing import tiny_hf_model

CLEAN = torch.tensor([[0, 5, 17, 33, 8, 91, 120, 44, 7, 60, 250, 13]])
CORRUPT = torch.tensor([[0, 5, 17, 33, 8, 200, 121, 44, 7, 60, 250, 13]])


def metric_fn(logits):
    return logits[:, -1, 3] - logits[:, -1, 9]


@pytest.mark.parametrize("site", ["z", "q", "k", "v", "pattern"])
def test_patch_identity_when_clean_equals_corrupted(tiny_llama, site):
    base = float(metric_fn(tiny_llama(CORRUPT)))
    res = patch_heads(tiny_llama, CORRUPT, CORRUPT, metric_fn, site=site)
    info = model_info(tiny_llama)
    slots = info.n_kv_heads if site in ("k", "v") else info.n_heads
    assert res.shape == (info.n_layers, slots)
    assert torch.all(res == base)


@pytest.mark.parametrize("site", ["z", "q", "k", "v", "pattern"])
def test_patch_matches_hand_written_hooks(tiny_llama, site):
    hook = {"z": "hook_z", "q": "hook_q", "k": "hook_k", "v": "hook_v", "pattern": "hook_pattern"}[site]
    res = patch_heads(tiny_llama, CORRUPT, CLEAN, metric_fn, site=site)
    _, clean_cache = tiny_llama.run_with_cache(CLEAN)
    info = model_info(tiny_llama)
    slots = info.n_kv_heads if site in ("k", "v") else info.n_heads
    base = float(metric_fn(tiny_llama(CORRUPT)))
    moved = 0
    for l in range(info.n_layers):
        for h in range(slots):
            name = hook_name(l, hook)
            src = clean_cache[name]

            def fn(x, hook, h=h, src=src):
                x = x.clone()
                if site == "pattern":
                    x[:, h] = src[:, h]
                else:
                    x[..., h, :] = src[..., h, :]
                return x

            with tiny_llama.hooks(fwd_hooks=[(name, fn)]):
                ref = float(metric_fn(tiny_llama(CORRUPT)))
            assert res[l, h] == pytest.approx(ref, abs=1e-6)
            moved += abs(ref - base) > 1e-4
    assert moved > 0, "patching must move the metric for some head"


def test_patch_gqa_kv_axis_and_per_position(tiny_llama):
    info = model_info(tiny_llama)
    r = patch_heads(tiny_llama, CORRUPT, CLEAN, metric_fn, site="k", per_position=True, positions=[5, 6, 11])
    assert r.shape == (info.n_layers, CLEAN.shape[1], info.n_kv_heads)
    assert torch.isnan(r[:, 0]).all() and not torch.isnan(r[:, 5]).any()
    # positions where clean == corrupted tokens in layer 0 carry identical keys: patch = no change
    base = float(metric_fn(tiny_llama(CORRUPT)))
    assert torch.allclose(r[0, 11], torch.full_like(r[0, 11], base), atol=0)
    # per-position patching of every position at once == all-position patching is not additive, but
    # a single-position patch at a corrupted token differs from the baseline
    assert (r[0, 5] - base).abs().max() > 1e-5


def test_patch_reuses_cache_and_validates(tiny_llama):
    cache = cache_sites(tiny_llama, CLEAN, ["z"])
    assert set(cache) == {hook_name(l, "hook_z") for l in range(2)}
    a = patch_heads(tiny_llama, CORRUPT, cache, metric_fn, site="z")
    b = patch_heads(tiny_llama, CORRUPT, CLEAN, metric_fn, site="z")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="same shape"):
        patch_heads(tiny_llama, CORRUPT, CLEAN[:, :-1], metric_fn)
    with pytest.raises(ValueError, match="lacks"):
        patch_heads(tiny_llama, CORRUPT, cache, metric_fn, site="v")
    with pytest.raises(ValueError, match="Unknown site"):
        patch_heads(tiny_llama, CORRUPT, CLEAN, metric_fn, site="resid")
    r = patch_heads(tiny_llama, CORRUPT, CLEAN, metric_fn, layers=[1])
    assert torch.isnan(r[0]).all() and not torch.isnan(r[1]).any()
    assert count_hooks(tiny_llama) == 0


def _o_slice(arch, hf, layer):
    if arch == "gpt2":
        return hf.transformer.h[layer].attn.c_proj  # Conv1D: x @ W + b, W [in, out]
    return hf.model.layers[layer].self_attn.o_proj  # Linear: x @ W.T


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zero_and_mean_ablation_match_edited_weights(arch, request):
    model = request.getfixturevalue(f"tiny_{arch}")
    d = model_info(model).d_head
    heads = [(0, 1), (1, 3)]
    ref_tokens = [CLEAN[0], CORRUPT[0, :9]]
    base = model(CORRUPT)
    with ablate_heads(model, heads, mode="zero"):
        zero = model(CORRUPT)
        gen = model.generate(CORRUPT, max_new_tokens=3, do_sample=False, verbose=False, stop_at_eos=False)
    means = head_means(model, heads, ref_tokens)
    with ablate_heads(model, heads, mode="mean", mean_over=ref_tokens):
        mean = model(CORRUPT)
    assert not torch.allclose(zero, base) and not torch.allclose(mean, zero)
    # Reference: the same ablations as weight edits of an HF copy (W_O columns of the head zeroed; for
    # mean ablation the head's mean output W_O[h] @ mean added as a bias).
    for mode, got in (("zero", zero), ("mean", mean)):
        hf = tiny_hf_model(arch)
        with torch.no_grad():
            for l, h in heads:
                o = _o_slice(arch, hf, l)
                cols = slice(h * d, (h + 1) * d)
                if arch == "gpt2":
                    w_h = o.weight[cols, :].clone()  # [d, d_model]
                    o.weight[cols, :] = 0
                    if mode == "mean":
                        o.bias += means[(l, h)] @ w_h
                else:
                    w_h = o.weight[:, cols].clone()  # [d_model, d]
                    o.weight[:, cols] = 0
                    if mode == "mean":
                        if o.bias is None:
                            o.bias = torch.nn.Parameter(torch.zeros(o.weight.shape[0]))
                        o.bias += w_h @ means[(l, h)]
        torch.testing.assert_close(got, hf(CORRUPT).logits, atol=2e-5, rtol=1e-5)
    assert gen.shape == (1, CORRUPT.shape[1] + 3)


def test_ablation_validation(tiny_llama):
    with pytest.raises(ValueError, match="mean_over"):
        ablate_heads(tiny_llama, [(0, 0)], mode="mean")
    with pytest.raises(ValueError, match="mode"):
        ablate_heads(tiny_llama, [(0, 0)], mode="resample")
    with pytest.raises(ValueError, match="Unknown head"):
        ablate_heads(tiny_llama, [(5, 0)])
    with pytest.raises(ValueError, match="only used"):
        ablate_heads(tiny_llama, [(0, 0)], mean_over=CLEAN)
    assert count_hooks(tiny_llama) == 0


def test_logit_diff_metric_rejects_same_token(tiny_llama):
    with pytest.raises(ValueError, match="same token"):
        logit_diff_metric(tiny_llama, 5, 5)
    m = logit_diff_metric(tiny_llama, 3, 9)
    logits = tiny_llama(CLEAN)
    assert float(m(logits)) == pytest.approx(float(metric_fn(logits)))


def test_corrupted_pair_real_tokenizer_and_model(smollm):
    from focuslens.tasks import make_synthetic_qa

    ex = make_synthetic_qa(1, n_docs=2, seed=3)[0]  # a seed where SmolLM2 answers correctly
    clean, corrupt = make_corrupted_pair(smollm, ex)
    assert clean.tokens.shape == corrupt.tokens.shape
    assert clean.prompt.spans == corrupt.prompt.spans
    diff = (clean.tokens != corrupt.tokens).nonzero().flatten()
    assert len(diff) > 0 and all(clean.relevant.start <= int(i) < clean.relevant.end for i in diff)
    # Put the model at the answer: append its own clean answer up to the value to both prompts.
    tok = smollm.tokenizer
    out = smollm.generate(clean.tokens[None], max_new_tokens=16, do_sample=False, verbose=False)
    text = tok.decode(out[0, len(clean.tokens):])
    at = text.find(clean.answers[0])
    assert at > 0, f"SmolLM2 should answer with the gold value here, got {text!r}"
    suffix = torch.tensor(tok(text[:at].rstrip(), add_special_tokens=False)["input_ids"])
    clean_t = torch.cat([clean.tokens, suffix])[None]
    corrupt_t = torch.cat([corrupt.tokens, suffix])[None]
    metric = logit_diff_metric(smollm, " " + clean.answers[0], " " + corrupt.answers[0])
    with torch.no_grad():
        m_clean = float(metric(smollm(clean_t)))
        m_corrupt = float(metric(smollm(corrupt_t)))
    assert m_clean > 0 > m_corrupt, "the model must follow the gold document in both prompts"
    res = patch_heads(smollm, corrupt_t, clean_t, metric, site="z", layers=[20])
    assert res.shape == (30, 9) and not torch.isnan(res[20]).any()
    assert (res[20] - m_corrupt).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# Batched patching: equal to one-by-one and to TransformerLens' own patching functions
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("site", ["z", "q", "k", "v", "pattern"])
def test_batched_equals_loop(arch, site, request):
    model = request.getfixturevalue(f"tiny_{arch}")
    for per_position, bs in ((False, None), (False, 3), (True, 5)):
        kw = {"site": site, "per_position": per_position, "positions": [0, 5, 6, 11] if per_position else None}
        loop = patch_heads(model, CORRUPT, CLEAN, metric_fn, method="loop", **kw)
        batched = patch_heads(model, CORRUPT, CLEAN, metric_fn, method="batched", batch_size=bs, **kw)
        assert torch.equal(torch.isnan(loop), torch.isnan(batched))
        torch.testing.assert_close(batched, loop, atol=1e-5, rtol=0, equal_nan=True)
    base = float(metric_fn(model(CORRUPT)))
    assert (loop[~torch.isnan(loop)] - base).abs().max() > 1e-4, "patching must move the metric"
    assert count_hooks(model) == 0


@pytest.mark.parametrize("site", ["z", "k", "pattern"])
def test_batched_shared_prefix_beyond_a_sliding_window(tiny_gemma3, site):
    """The corrupted tokens differ late (position 25 of 36): the shared-prefix KV cache of Gemma-3's
    sliding layer (window 8) holds fewer keys than the prompt; per-position jobs before the first
    difference must give the corrupted metric; the whole result equals the loop."""
    ids = [0, 5, 17, 33, 8, 91, 120, 44, 7, 60, 250, 13] * 3
    clean = torch.tensor([ids])
    corrupt = clean.clone()
    corrupt[0, 25:27] = torch.tensor([200, 121])
    for per_position in (False, True):
        kw = {"site": site, "per_position": per_position, "positions": [3, 20, 25, 26, 35] if per_position else None}
        loop = patch_heads(tiny_gemma3, corrupt, clean, metric_fn, method="loop", **kw)
        batched = patch_heads(tiny_gemma3, corrupt, clean, metric_fn, batch_size=4, **kw)
        torch.testing.assert_close(batched, loop, atol=1e-5, rtol=0, equal_nan=True)
    base = float(metric_fn(tiny_gemma3(corrupt)))
    assert torch.all(batched[:, [3, 20]] == base)
    assert (batched[:, 25:][~torch.isnan(batched[:, 25:])] - base).abs().max() > 1e-4
    assert count_hooks(tiny_gemma3) == 0


def test_batched_with_several_prompts_and_a_cache(tiny_llama):
    """b > 1 corrupted prompts (the input is repeated, the metric sees each run's b rows); a clean cache."""
    clean2 = torch.cat([CLEAN, CLEAN.flip(1)])
    corrupt2 = torch.cat([CORRUPT, CORRUPT.flip(1)])
    seen = []

    def metric(logits):
        seen.append(logits.shape[0])
        return metric_fn(logits).mean()

    loop = patch_heads(tiny_llama, corrupt2, clean2, metric, site="v", method="loop")
    cache = cache_sites(tiny_llama, clean2, ["v"])
    batched = patch_heads(tiny_llama, corrupt2, cache, metric, site="v", batch_size=3)
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=0)
    assert set(seen) == {2}
    with pytest.raises(ValueError, match="method"):
        patch_heads(tiny_llama, CORRUPT, CLEAN, metric_fn, method="fast")
    with pytest.raises(ValueError, match="batch_size"):
        patch_heads(tiny_llama, CORRUPT, CLEAN, metric_fn, batch_size=0)

    def boom(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        patch_heads(tiny_llama, CORRUPT, CLEAN, boom)
    assert count_hooks(tiny_llama) == 0


def test_batched_matches_transformer_lens_patching(tiny_llama):
    """TransformerLens 4's own ``patching`` functions run on the bridge (GQA k/v per KV head)."""
    import transformer_lens.patching as tlp

    _, clean_cache = tiny_llama.run_with_cache(CLEAN)
    pairs = [
        ("z", False, tlp.get_act_patch_attn_head_out_all_pos),
        ("q", False, tlp.get_act_patch_attn_head_q_all_pos),
        ("k", False, tlp.get_act_patch_attn_head_k_all_pos),
        ("v", False, tlp.get_act_patch_attn_head_v_all_pos),
        ("pattern", False, tlp.get_act_patch_attn_head_pattern_all_pos),
        ("z", True, tlp.get_act_patch_attn_head_out_by_pos),
        ("k", True, tlp.get_act_patch_attn_head_k_by_pos),
        ("pattern", True, tlp.get_act_patch_attn_head_pattern_by_pos),  # TL: [layer, head, dest_pos]
    ]
    for site, per_position, fn in pairs:
        ref = fn(tiny_llama, CORRUPT, clean_cache, lambda lg: metric_fn(lg).mean()).float()
        if site == "pattern" and per_position:
            ref = ref.transpose(1, 2)
        got = patch_heads(tiny_llama, CORRUPT, CLEAN, metric_fn, site=site, per_position=per_position)
        assert got.shape == ref.shape, (site, per_position)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
