"""The public focuslens API on a legacy TransformerLens ``HookedTransformer`` (TransformerLens 3.9).

Core exactness, on two architectures (GPT-2 style with learned positions; Llama style with RoPE and
GQA): contextual scores equal a reference read from ``hook_pattern``; split softmax with tau = 1 and
injection with alpha = 0 are bit-identical identities; untouched heads are bit-identical; hooks are
removed after an exception; focus directions round trip (train, save, load, apply). Then patching,
ablation, generation, evaluation and the ``FocusLens`` wrapper, and SmolLM2 converted offline.

Collected and skipped in the main (TL 4) environment; run by ``bash scripts/legacy_env.sh``.
"""

from __future__ import annotations

import math

import pytest
import torch

from legacy_models import HAVE_LEGACY, SKIP_REASON, build_legacy

pytestmark = [pytest.mark.legacy, pytest.mark.skipif(not HAVE_LEGACY, reason=SKIP_REASON)]

import focuslens as fl  # noqa: E402
from focuslens.core.hooks import attach_hooks, count_hooks  # noqa: E402
from focuslens.core.models import hook_name, is_legacy, model_info  # noqa: E402
from focuslens.core.prompts import Span  # noqa: E402
from focuslens.testing import naive_greedy as _naive_greedy

TOKENS = torch.tensor([[0, 5, 17, 33, 8, 91, 120, 44, 7, 60, 250, 13, 99, 150, 31, 77]])
SPAN = Span(4, 9)
SPLIT_HEADS = [(0, 1), (1, 0), (1, 3)]



def _tokens(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n,), generator=g)


def _patterns(model, toks) -> torch.Tensor:
    """[layer, head, q, k] read from hook_pattern with TransformerLens' own run_with_cache."""
    names = [hook_name(l, "hook_pattern") for l in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(torch.as_tensor(toks).reshape(1, -1), names_filter=names)
    return torch.stack([cache[n][0] for n in names]).float()


def _ref_mass(att, response, cols) -> torch.Tensor:
    mask = torch.zeros(att.shape[-1], dtype=torch.bool)
    for a, b in cols:
        mask[a:b] = True
    return att[:, :, response[0]:response[1]][..., mask].sum(-1).mean(-1)


# --------------------------------------------------------------------------------------------------
# The model fits the HookedModel interface
# --------------------------------------------------------------------------------------------------


def test_fits_the_interface(legacy_any):
    assert is_legacy(legacy_any) and isinstance(legacy_any, fl.HookedModel)
    assert fl.load_model(legacy_any) is legacy_any
    info = model_info(legacy_any)
    rotary = legacy_any.cfg.model_name == "legacy-llama"
    assert (info.n_layers, info.n_heads, info.d_head, info.rotary) == (2, 4, 16, rotary)
    assert info.n_kv_heads == (2 if rotary else 4)
    for la in fl.core.attention.qk_route(legacy_any)[0]:
        assert la.exact and la.scale == 0.25
        assert la.q_hook.endswith("hook_rot_q" if rotary else "hook_q")


# --------------------------------------------------------------------------------------------------
# Core exactness
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", "qk", "pattern"])
def test_scores_equal_the_hook_pattern_reference(legacy_any, method):
    toks = _tokens()
    att = _patterns(legacy_any, toks)
    R, C = (36, 48), [(3, 10), (20, 27)]
    s = fl.contextual_scores(legacy_any, toks, relevant=C, response=R, method=method)
    assert s.shape == (2, 4) and s.dtype == torch.float32
    torch.testing.assert_close(s, _ref_mass(att, R, C), atol=1e-5, rtol=0)
    assert s.min() > 0 and s.std() > 1e-3  # non-trivial: heads differ


def test_gqa_heads_sharing_a_kv_head_get_their_own_scores(legacy_llama):
    s = fl.contextual_scores(legacy_llama, _tokens(), relevant=(3, 20), response=(36, 48))
    assert model_info(legacy_llama).n_kv_heads == 2 and not torch.allclose(s[:, 0], s[:, 1])


def test_split_tau_one_and_inject_alpha_zero_are_exact_identities(legacy_any):
    base = legacy_any(TOKENS)
    with fl.split_softmax(legacy_any, SPLIT_HEADS, SPAN, 1.0) as h:
        assert h.n_hooks == 2
        out = legacy_any(TOKENS)
    assert torch.equal(out, base)
    g = torch.Generator().manual_seed(0)
    vecs = {(0, 1): torch.randn(16, generator=g) * 2, (1, 3): torch.randn(16, generator=g) * 2}
    with fl.intervene.inject_vectors(legacy_any, vecs, alpha=0.0):
        out = legacy_any(TOKENS)
    assert torch.equal(out, base)
    with fl.intervene.inject_vectors(legacy_any, vecs, alpha=1.0):
        moved = legacy_any(TOKENS)
    assert (moved - base).abs().max() > 1e-2


@pytest.mark.parametrize("tau", [0.2, 2.5])
def test_split_matches_a_hand_written_pattern_edit(legacy_any, tau):
    """The METHOD.md formula in float64 as a plain hook_pattern hook (no focuslens code)."""
    spans = [Span(2, 5), Span(8, 11)]
    m = torch.zeros(TOKENS.shape[1], dtype=torch.bool)
    for s in spans:
        m[s.start:s.end] = True

    def edit(heads):
        def fn(x, hook):
            x = x.clone()
            for h in heads:
                a = x[:, h].double()
                pi = a[..., m].sum(-1, keepdim=True)
                ok = (pi > 0) & (pi < 1)
                pit = pi.clamp_min(1e-300) ** tau
                new = torch.where(m, a * pit / pi.clamp_min(1e-300), a * (1 - pit) / (1 - pi).clamp_min(1e-300))
                x[:, h] = torch.where(ok, new, a).to(x.dtype)
            return x
        return fn

    ref = legacy_any.run_with_hooks(TOKENS, fwd_hooks=[
        (hook_name(0, "hook_pattern"), edit([1])), (hook_name(1, "hook_pattern"), edit([0, 3]))])
    base = legacy_any(TOKENS)
    with fl.split_softmax(legacy_any, SPLIT_HEADS, spans, tau):
        out = legacy_any(TOKENS)
    assert (out - base).abs().max() > 1e-2
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["split", "inject", "ablate"])
def test_untouched_heads_are_bit_identical(legacy_any, kind):
    name = hook_name(0, "hook_z")
    _, base = legacy_any.run_with_cache(TOKENS, names_filter=[name])
    if kind == "split":
        handle = fl.split_softmax(legacy_any, [(0, 1)], SPAN, 0.3)
    elif kind == "inject":
        handle = fl.intervene.inject_vectors(legacy_any, {(0, 1): torch.ones(16) * 2})
    else:
        handle = fl.heads.ablate_heads(legacy_any, [(0, 1)])
    with handle:
        _, c = legacy_any.run_with_cache(TOKENS, names_filter=[name])
    z0, z1 = base[name], c[name]
    for h in range(4):
        assert torch.equal(z0[:, :, h], z1[:, :, h]) == (h != 1), f"head {h}"
    if kind == "ablate":
        assert torch.all(z1[:, :, 1] == 0)


def test_hooks_removed_after_an_exception(legacy_any, monkeypatch):
    import focuslens.score.contextual as sc

    before = legacy_any(TOKENS)

    def boom(*a, **k):
        raise RuntimeError("boom in hook")

    monkeypatch.setattr(sc, "_response_rows_qk", boom)
    with pytest.raises(RuntimeError, match="boom in hook"):
        fl.contextual_scores(legacy_any, _tokens(), relevant=(1, 5), response=(40, 48), method="qk")
    assert count_hooks(legacy_any) == 0
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="inside the block"):
        with fl.split_softmax(legacy_any, SPLIT_HEADS, SPAN, 0.3):
            legacy_any(TOKENS)
            raise RuntimeError("inside the block")
    assert count_hooks(legacy_any) == 0

    def bad_hook(x, hook):
        raise ValueError("hook failed during forward")

    with pytest.raises(ValueError, match="during forward"):
        with attach_hooks(legacy_any, [(hook_name(1, "hook_pattern"), bad_hook)]):
            legacy_any(TOKENS)
    assert count_hooks(legacy_any) == 0
    torch.testing.assert_close(legacy_any(TOKENS), before, atol=0, rtol=0)


def _dx(model):
    from focuslens.directions import make_direction_examples
    from focuslens.tasks import Document, TaskExample

    exs = []
    for i in range(6):
        ctxs = [Document(title=f"A{j}", text=f"The capital of A{j} is {chr(66 + j)}{i % 5}.") for j in range(3)]
        g = i % 3
        exs.append(TaskExample(question=f"What is the capital of A{g}?", answers=[f"{chr(66 + g)}{i % 5}"],
                               ctxs=ctxs, gold_index=g))
    return make_direction_examples(model, exs, responses=[f"The capital is {chr(66 + i % 3)}." for i in range(6)])


def test_directions_train_save_load_apply_round_trip(legacy_any, tmp_path):
    from focuslens.directions import FocusDirections, train_focus_directions

    dx = _dx(legacy_any)
    heads = [(1, 2), (0, 1), (1, 3)]
    d = train_focus_directions(legacy_any, dx[:4], heads=heads, val_examples=dx[4:], steps=30, progress=False)
    assert d.heads == heads and d.vectors.shape == (3, 16) and torch.isfinite(d.vectors).all()
    assert d.training["heldout_relevant_attention_after"] > d.training["heldout_relevant_attention_before"]
    d.save(tmp_path / "fd")
    e = FocusDirections.load(tmp_path / "fd", model=legacy_any)
    assert e.heads == d.heads and torch.equal(e.vectors, d.vectors)
    toks = dx[0].prompt.tokens[None]
    with torch.no_grad():
        base = legacy_any(toks)
        with d.apply(legacy_any, alpha=2.0):
            a = legacy_any(toks)
        with e.apply(legacy_any, alpha=2.0):
            b = legacy_any(toks)
        with e.apply(legacy_any, alpha=0.0):
            zero = legacy_any(toks)
    assert torch.equal(a, b) and torch.equal(zero, base) and not torch.allclose(a, base, atol=1e-4)
    other = "legacy_llama" if legacy_any.cfg.model_name == "legacy-gpt2" else "legacy_gpt2"
    with pytest.raises(ValueError):
        FocusDirections.load(tmp_path / "fd", model=build_legacy(other.removeprefix("legacy_")))


# --------------------------------------------------------------------------------------------------
# Patching, generation, evaluation, the wrapper
# --------------------------------------------------------------------------------------------------


def test_patching_identity_and_hand_written_reference(legacy_any):
    clean, corrupt = TOKENS.clone(), TOKENS.clone()
    corrupt[0, 6] = 200

    def metric(logits):
        return logits[0, -1, 5] - logits[0, -1, 6]

    base = float(metric(legacy_any(corrupt)))
    same = fl.patch_heads(legacy_any, corrupt, corrupt, metric, site="z")
    assert same.shape == (2, 4) and torch.all(same == base)
    res = fl.patch_heads(legacy_any, corrupt, clean, metric, site="z")
    _, cc = legacy_any.run_with_cache(clean, names_filter=[hook_name(1, "hook_z")])

    def put(x, hook):
        x = x.clone()
        x[:, :, 2] = cc[hook_name(1, "hook_z")][:, :, 2]
        return x

    ref = float(metric(legacy_any.run_with_hooks(corrupt, fwd_hooks=[(hook_name(1, "hook_z"), put)])))
    assert math.isclose(float(res[1, 2]), ref, abs_tol=1e-5)
    assert not torch.all(res == base)


def test_greedy_generation_with_the_cache_equals_full_forwards(legacy_any):
    from focuslens.core.generation import greedy_generate

    toks = _tokens(20, seed=3)
    ids, text = greedy_generate(legacy_any, toks, max_new_tokens=8, stop_at_newline=False, stop_ids=[])
    assert ids == _naive_greedy(legacy_any, toks, 8)
    assert text == legacy_any.tokenizer.decode(ids)
    with fl.split_softmax(legacy_any, SPLIT_HEADS, SPAN, 0.2):  # hooks fire at the prefill and every step
        ids_s, _ = greedy_generate(legacy_any, toks, max_new_tokens=8, stop_at_newline=False, stop_ids=[])
        assert ids_s == _naive_greedy(legacy_any, toks, 8)


def test_batched_generation_equals_one_by_one(legacy_any):
    from focuslens.core.generation import greedy_generate, greedy_generate_batch

    prompts = [_tokens(n, seed=n) for n in (14, 20, 17)]
    one = [greedy_generate(legacy_any, p, max_new_tokens=6, stop_at_newline=False, stop_ids=[])[0] for p in prompts]
    bat = greedy_generate_batch(legacy_any, prompts, max_new_tokens=6, stop_at_newline=False, stop_ids=[])
    assert [b[0] for b in bat] == one


def test_evaluate_and_margins(legacy_any, tmp_path):
    from focuslens.intervene.span_specs import SplitSoftmax
    from focuslens.tasks import make_synthetic_qa, render

    exs = make_synthetic_qa(3, n_docs=3, seed=0, doc_sentences=1)
    res = fl.evaluate(legacy_any, exs, max_new_tokens=4, progress=False, output=tmp_path / "e.jsonl")
    assert len(res) == 3 and 0.0 <= res.accuracy <= 1.0
    rs = [render(e, legacy_any) for e in exs]
    for r, rec in zip(rs, res.predictions):
        ids, text = fl.core.greedy_generate(legacy_any, r.tokens, max_new_tokens=4)
        assert rec == text
    spec = SplitSoftmax([(0, 1), (1, 2)], tau=0.3)
    res2 = fl.evaluate(legacy_any, exs, intervene=spec, max_new_tokens=4, progress=False)
    assert len(res2) == 3
    mr = fl.evaluation.teacher_forced_margins(legacy_any, rs)
    assert len(mr) == 3


def test_focuslens_wrapper(legacy_any):
    lens = fl.FocusLens(legacy_any)
    assert lens.hooked and lens.info == model_info(legacy_any)
    toks = _tokens()
    hs = lens.score(toks, response=(36, 48), relevant=(3, 10))
    ref = fl.score.score_spans(legacy_any, toks, response=(36, 48), spans={"relevant": (3, 10)})
    assert torch.equal(hs.relevant, ref.relevant)
    base = legacy_any(TOKENS)
    with lens.split_softmax([(0, 1)], SPAN, tau=1.0):
        assert torch.equal(legacy_any(TOKENS), base)
    with lens.ablate([(1, 1)]):
        assert not torch.equal(legacy_any(TOKENS), base)
    assert lens.generate(_tokens(12), max_new_tokens=3) == fl.core.greedy_generate(legacy_any, _tokens(12), max_new_tokens=3)[1]


# --------------------------------------------------------------------------------------------------
# The real SmolLM2, converted offline for the legacy HookedTransformer
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm_converted_offline_scores_equal_hf_eager(legacy_smollm):
    from transformers import AutoModelForCausalLM

    from focuslens.core.models import default_model_dir

    m = legacy_smollm
    assert is_legacy(m) and model_info(m).n_kv_heads == 3 and model_info(m).rotary
    hf = AutoModelForCausalLM.from_pretrained(str(default_model_dir()), dtype=torch.float32).eval()
    hf.set_attn_implementation("eager")
    toks = m.tokenizer("The capital of Veloria is Quentor. The capital of Marn is Pell. So the capital of Marn is",
                       return_tensors="pt").input_ids[0]
    with torch.no_grad():
        out = hf(toks[None], output_attentions=True)
    torch.testing.assert_close(m(toks[None]), out.logits, atol=5e-4, rtol=1e-4)
    att = torch.stack(out.attentions)[:, 0].float()
    n = toks.numel()
    R, C = (n - 4, n), [(8, 14)]
    s = fl.contextual_scores(m, toks, relevant=C, response=R, method="qk")
    torch.testing.assert_close(s, _ref_mass(att, R, C), atol=1e-4, rtol=0)
