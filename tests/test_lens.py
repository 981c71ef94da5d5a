"""FocusLens(model): every method returns what the module function underneath returns, and cleans up."""

from __future__ import annotations

import pytest
import torch

import focuslens as fl
from focuslens.core.hooks import count_hooks
from focuslens.tasks import make_synthetic_qa, render


@pytest.fixture(scope="module")
def rendered(tiny_llama):
    return [render(e, tiny_llama.tokenizer) for e in make_synthetic_qa(3, n_docs=3, seed=5)]


def test_refuses_what_is_not_a_model():
    with pytest.raises(TypeError, match="hooked model"):
        fl.FocusLens(object())


def test_derived_once_and_repr(tiny_llama):
    lens = fl.FocusLens(tiny_llama)
    assert lens.info == fl.model_info(tiny_llama)
    assert lens.attention is lens.attention and len(lens.attention) == 2
    assert lens.attention[0].q_hook == "blocks.0.attn.hook_rot_q"
    assert lens.stop_ids == fl.core.generation.stop_ids(tiny_llama.tokenizer)
    assert "2 layers × 4 heads (2 KV)" in repr(lens)
    assert fl.FocusLens(lens).model is tiny_llama


def test_score_equals_score_spans(tiny_llama, rendered):
    lens = fl.FocusLens(tiny_llama)
    r = rendered[0]
    full = r.prompt.with_response(tiny_llama.tokenizer, " The capital is B.")
    got = lens.score(full.tokens, response=full.response, relevant=r.relevant)
    ref = fl.score.score_spans(tiny_llama, full.tokens, response=full.response, spans={"relevant": r.relevant})
    assert type(got) is type(ref)
    for name in ref.names:
        assert torch.equal(got[name], ref[name])
    by_example = lens.score(r, response=" The capital is B.")
    assert torch.equal(by_example["relevant"], ref["relevant"]) and "distractors_total" in by_example
    with pytest.raises(ValueError, match="response="):
        lens.score(full.tokens, relevant=r.relevant)


def test_dataset_ranking_and_heatmap(tiny_llama, rendered):
    lens = fl.FocusLens(tiny_llama)
    with pytest.raises(ValueError, match="score_dataset"):
        lens.heads(2)
    ds = lens.score_dataset(rendered, response="gold", progress=False)
    ref = fl.score_dataset(tiny_llama, rendered, response="gold", progress=False)
    assert torch.equal(ds.mean["relevant"], ref.mean["relevant"]) and lens.scores is ds
    assert lens.heads(3) == ref.top_k(3) == fl.score.contextual_heads(ref, 3)
    fig = lens.heatmap(top_k=3)
    assert fig.data[0].z is not None and "n=3" in fig.layout.title.text
    assert lens.heads(2, scores=ref.mean["relevant"]) == ref.top_k(2)


def test_interventions_equal_the_eager_functions_and_leave_no_hooks(tiny_llama, rendered):
    lens = fl.FocusLens(tiny_llama)
    r = rendered[1]
    toks = r.tokens[None]
    heads = [(1, 0), (0, 3)]
    with torch.no_grad():
        base = tiny_llama(toks)
        with fl.split_softmax(tiny_llama, heads, r.relevant, 0.3):
            ref = tiny_llama(toks)
        with lens.split_softmax(heads, r.relevant, tau=0.3) as h:
            got = tiny_llama(toks)
        assert not h.active and torch.equal(got, ref) and not torch.equal(got, base)
        with fl.intervene.pasta(tiny_llama, heads, r.relevant, 0.05):
            ref = tiny_llama(toks)
        with lens.pasta(heads, r.relevant, coefficient=0.05):
            got = tiny_llama(toks)
        assert torch.equal(got, ref) and not torch.equal(got, base)
        vecs = {(1, 2): torch.randn(16), (0, 1): torch.randn(16)}
        with fl.intervene.inject_vectors(tiny_llama, vecs, alpha=0.7):
            ref = tiny_llama(toks)
        with lens.inject(vecs, alpha=0.7):
            assert torch.equal(tiny_llama(toks), ref)
        with fl.heads.ablate_heads(tiny_llama, heads, mode="zero"):
            ref = tiny_llama(toks)
        with lens.ablate(heads):
            assert torch.equal(tiny_llama(toks), ref)
        d = fl.directions.random_like(fl.FocusDirections(
            heads=heads, vectors=torch.ones(2, 16), fingerprint=lens.info.fingerprint(), model_name=lens.info.name,
            site="hook_rot_q", alpha=1.0), seed=3)
        with d.apply(tiny_llama, alpha=0.5):
            ref = tiny_llama(toks)
        with lens.steer(d, alpha=0.5):
            assert torch.equal(tiny_llama(toks), ref)
    assert count_hooks(tiny_llama) == 0
    with pytest.raises(RuntimeError):
        with lens.split_softmax(heads, r.relevant, tau=0.3):
            raise RuntimeError("interrupted")
    assert count_hooks(tiny_llama) == 0


def test_generate_and_evaluate_equal_the_module_functions(tiny_llama, rendered):
    lens = fl.FocusLens(tiny_llama)
    r = rendered[0]
    assert lens.generate(r, max_new_tokens=4) == fl.core.greedy_generate(tiny_llama, r.tokens, max_new_tokens=4)[1]
    got = lens.evaluate(rendered, max_new_tokens=3, progress=False)
    ref = fl.evaluate(tiny_llama, rendered, max_new_tokens=3, progress=False)
    assert got.predictions == ref.predictions and type(got) is type(ref)


def test_patch_equals_patch_heads(tiny_llama):
    lens = fl.FocusLens(tiny_llama)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(5, 300, (1, 12), generator=g)
    corrupt = clean.clone()
    corrupt[0, 3] = 7
    metric = lambda logits: logits[0, -1, 11] - logits[0, -1, 12]  # noqa: E731
    ref = fl.patch_heads(tiny_llama, corrupt, clean, metric, site="z")
    got = lens.patch(corrupt, clean, metric, site="z")
    assert torch.equal(got, ref) and got.shape == (2, 4)
    att = lens.attribute(corrupt, clean, metric, site="z")
    assert torch.equal(att, fl.attribution_patch_heads(tiny_llama, corrupt, clean, metric, site="z"))
    assert att.shape == (2, 4) and count_hooks(tiny_llama) == 0


def test_same_notebook_code_on_the_fused_backend(tiny_llama, rendered):
    """FocusLens(FusedModel): score / split_softmax / inject give the TransformerLens path's types and values."""
    from focuslens.engine import FusedModel
    from focuslens.testing import tiny_hf_model, tiny_tokenizer

    fused = fl.FocusLens(FusedModel(tiny_hf_model("llama"), tiny_tokenizer()))  # same weights as tiny_llama (seed 0)
    lens = fl.FocusLens(tiny_llama)
    r = rendered[2]
    full = r.prompt.with_response(tiny_llama.tokenizer, " The capital is B.")
    a = lens.score(full.tokens, response=full.response, relevant=r.relevant)
    b = fused.score(full.tokens, response=full.response, relevant=r.relevant)
    assert type(a) is type(b) and set(a.names) <= set(b.names)
    for name in a.names:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0)
    assert fused.info.n_layers == 2 and fused.info.n_kv_heads == 2 and "FusedModel" in repr(fused)
    heads = [(1, 0), (0, 3)]
    toks = full.tokens[None]
    with torch.no_grad():
        with lens.split_softmax(heads, r.relevant, tau=0.3):
            ref = tiny_llama(toks)
        with fused.split_softmax(heads, r.relevant, tau=0.3) as h:
            got = fused.model(toks).logits
        assert not h.active
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
        vecs = {(1, 2): torch.randn(16, generator=torch.Generator().manual_seed(0))}
        with lens.inject(vecs, alpha=0.7):
            ref = tiny_llama(toks)
        with fused.inject(vecs, alpha=0.7):
            got = fused.model(toks).logits
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    for call in (lambda: fused.ablate(heads), lambda: fused.evaluate(rendered), lambda: fused.attention):
        with pytest.raises(TypeError, match="hooked model"):
            call()


def test_nnsight_scorer_through_the_lens(tiny_llama, rendered):
    """FocusLens(NNsightScorer): the same score() call and type; what it cannot do is a clear TypeError."""
    pytest.importorskip("nnsight")
    from focuslens.backends import nnsight_backend
    from focuslens.testing import tiny_hf_model, tiny_tokenizer

    lens = fl.FocusLens(nnsight_backend.NNsightScorer(tiny_hf_model("llama"), tiny_tokenizer()))
    r = rendered[0]
    full = r.prompt.with_response(tiny_llama.tokenizer, " The capital is B.")
    got = lens.score(full.tokens, response=full.response, relevant=r.relevant)
    ref = fl.score.score_spans(tiny_llama, full.tokens, response=full.response, spans={"relevant": r.relevant})
    torch.testing.assert_close(got["relevant"], ref["relevant"], atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="does not implement split_softmax"):
        lens.split_softmax([(0, 1)], r.relevant, tau=0.5)
    with pytest.raises(TypeError, match="hooked model"):
        lens.patch(full.tokens[None], full.tokens[None], lambda x: x.sum())


def test_find_heads_equals_the_module_function(tiny_llama, rendered):
    lens = fl.FocusLens(tiny_llama)
    for finder in ("qrhead", "retrieval"):
        got = lens.find_heads(rendered, finder=finder, progress=False)
        ref = fl.find_heads(tiny_llama, rendered, finder=finder, progress=False)
        assert torch.equal(got.mean["relevant"], ref.mean["relevant"]) and type(got) is type(ref)
    assert count_hooks(tiny_llama) == 0
