"""Fused-attention backend: exact against HF eager attention and the TransformerLens bridge, leak-free."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

from focuslens.backends.fused import load_fused
from focuslens.engine import FusedModel
from focuslens.engine.attention import ATTN_IMPL, is_registered
from focuslens.core.hooks import attach_hooks
from focuslens.score.contextual import HeadScores
from focuslens.testing import tiny_hf_model

ATOL = 1e-5


def _ids(n: int, seed: int = 0, vocab: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n,), generator=g)


def _eager_reference(hf_eager, ids, rows, spans):
    """Independent reference: HF eager attention, output_attentions=True, reduced by hand."""
    with torch.no_grad():
        att = hf_eager(ids[None], output_attentions=True).attentions  # L × [1, H, N, N]
    out = {}
    for name, (s, e) in spans.items():
        out[name] = torch.stack([a[0, :, rows[0] : rows[1], s:e].float().sum(-1).mean(-1) for a in att])
    return out


def _eager(arch: str, **kw):
    m = tiny_hf_model(arch, **kw)
    m.set_attn_implementation("eager")
    return m


def _split_ref(pattern: torch.Tensor, span, tau: float) -> torch.Tensor:
    """Slow reference of split softmax on a [..., q, k] pattern, row by row."""
    out = pattern.clone()
    flat = out.reshape(-1, pattern.shape[-1])
    src = pattern.reshape(-1, pattern.shape[-1])
    s, e = span
    for i in range(flat.shape[0]):
        row = src[i]
        pi = float(row[s:e].double().sum())
        rho = float(row[:s].double().sum() + row[e:].double().sum())
        if pi > 0 and rho > 0:
            pi = pi / (pi + rho)
            flat[i, s:e] = row[s:e] * (pi**tau / pi)
            flat[i, :s] = row[:s] * ((1 - pi**tau) / (1 - pi))
            flat[i, e:] = row[e:] * ((1 - pi**tau) / (1 - pi))
    return flat.reshape(pattern.shape)


# ------------------------------------------------------------------------------------------ scoring


@pytest.mark.parametrize("arch", ["llama", "llama_mha", "qwen2"])
def test_scores_match_hf_eager(arch):
    fm = FusedModel(tiny_hf_model(arch))
    ids = _ids(48, seed=1)
    spans = {"relevant": (5, 17), "other": (20, 31)}
    got = fm.score_spans(ids, response=(36, 48), spans=spans, sink=(0, 1))
    assert isinstance(got, HeadScores) and got.method == "fused" and got.columns.shape == (2, 4, 48)
    spans["sink"] = (0, 1)
    ref = _eager_reference(_eager(arch), ids, (36, 48), spans)
    for k in spans:
        assert got[k].shape == (2, 4) and got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], ref[k], atol=ATOL, rtol=0)
    assert got["relevant"].abs().sum() > 0.05  # non-trivial
    torch.testing.assert_close(fm.contextual_scores(ids, relevant=(5, 17), response=(36, 48)), got["relevant"])


def test_scores_match_transformerlens_bridge(tiny_llama):
    """Same numbers as a hook_pattern reduction on the TransformerLens bridge (same weights)."""
    fm = FusedModel(tiny_hf_model("llama"))
    ids = _ids(40, seed=2)
    rel, resp = (3, 15), (30, 40)
    L = tiny_llama.cfg.n_layers
    ref = torch.zeros(L, tiny_llama.cfg.n_heads)

    def make(layer):
        def fn(pattern, hook):  # [b, H, q, k]
            ref[layer] = pattern[0, :, resp[0] : resp[1], rel[0] : rel[1]].sum(-1).mean(-1)

        return fn

    with attach_hooks(tiny_llama, [(f"blocks.{l}.attn.hook_pattern", make(l)) for l in range(L)]):
        with torch.no_grad():
            tiny_llama(ids[None])
    torch.testing.assert_close(fm.contextual_scores(ids, relevant=rel, response=resp), ref, atol=ATOL, rtol=0)


def test_scores_match_scoring_module_if_present(tiny_llama):
    scoring = pytest.importorskip("focuslens.score.contextual", reason="focuslens.score.contextual (scoring engineer) not landed yet")
    fm = FusedModel(tiny_hf_model("llama"))
    ids = _ids(40, seed=3)
    ref = scoring.contextual_scores(tiny_llama, ids, relevant=(4, 14), response=(30, 40))
    got = fm.contextual_scores(ids, relevant=(4, 14), response=(30, 40))
    torch.testing.assert_close(got, torch.as_tensor(ref).float().cpu(), atol=ATOL, rtol=0)


def test_row_block_does_not_change_results():
    ids = _ids(30, seed=4)
    a = FusedModel(tiny_hf_model("llama"), row_block=1024)
    b = FusedModel(tiny_hf_model("llama"), row_block=3)
    with a.split_softmax([(1, 2)], span=(2, 9), tau=0.3), b.split_softmax([(1, 2)], span=(2, 9), tau=0.3):
        la = a(ids[None]).logits
        lb = b(ids[None]).logits
        sa = a.contextual_scores(ids, relevant=(2, 9), response=(20, 30))
        sb = b.contextual_scores(ids, relevant=(2, 9), response=(20, 30))
    torch.testing.assert_close(la, lb, atol=1e-6, rtol=0)
    torch.testing.assert_close(sa, sb, atol=1e-6, rtol=0)


def test_mlp_chunking_is_exact_and_restored():
    """Scoring passes run each MLP over ``mlp_chunk`` positions: same scores, forwards restored after."""
    ids = _ids(30, seed=5)
    whole = FusedModel(tiny_hf_model("llama"), mlp_chunk=None)
    m = tiny_hf_model("llama")
    chunked = FusedModel(m, mlp_chunk=7)
    assert len(chunked._mlps) == m.config.num_hidden_layers
    calls = []
    mlp0 = m.model.layers[0].mlp

    def spy(x, _f=type(mlp0).forward.__get__(mlp0)):  # an instance-level forward, as accelerate sets
        calls.append(x.shape[-2])
        return _f(x)

    mlp0.forward = spy
    s_whole = whole.contextual_scores(ids, relevant=(2, 9), response=(20, 30))
    s_chunk = chunked.contextual_scores(ids, relevant=(2, 9), response=(20, 30))
    assert calls == [7, 7, 7, 7, 2]  # 30 positions in chunks of 7
    torch.testing.assert_close(s_chunk, s_whole, atol=1e-6, rtol=0)
    assert mlp0.forward is spy and all("forward" not in x.__dict__ for x in chunked._mlps[1:])
    # plain forwards are never chunked, and a failing scoring pass restores the forwards too
    calls.clear()
    chunked(ids[None])
    assert calls == [30]
    with pytest.raises(Exception):
        chunked.contextual_scores(torch.tensor([1, 2, 10_000, 3] * 5), relevant=(0, 2), response=(12, 20))
    assert mlp0.forward is spy and all("forward" not in x.__dict__ for x in chunked._mlps[1:])
    with pytest.raises(ValueError, match="mlp_chunk"):
        FusedModel(tiny_hf_model("llama"), mlp_chunk=0)


def test_bf16_scores_close_to_fp32_and_returned_in_fp32():
    """bf16 weights (CPU here): results are fp32 and close to the fp32 model's."""
    ids = _ids(64, seed=5)
    f32 = FusedModel(tiny_hf_model("llama")).contextual_scores(ids, relevant=(4, 30), response=(48, 64))
    b16 = FusedModel(tiny_hf_model("llama").to(torch.bfloat16)).contextual_scores(ids, relevant=(4, 30), response=(48, 64))
    assert b16.dtype == torch.float32
    assert (b16 - f32).abs().max() < 3e-2
    assert (b16 - f32).abs().max() > 0  # really ran in bf16


def test_response_rows_are_computed_in_fp32_from_bf16_inputs():
    """The explicit rows use fp32 arithmetic on bf16 q/k (a bf16 softmax would be off by ~1e-3)."""
    from focuslens.engine.attention import _explicit_rows

    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 4, 8, 16, generator=g) * 3).to(torch.bfloat16)
    k = (torch.randn(1, 2, 40, 16, generator=g) * 3).to(torch.bfloat16)
    rows = torch.arange(32, 40)
    got = _explicit_rows(q, k, None, 2, rows, None, 0.25, 0)
    assert got.dtype == torch.float32
    kk = k.double().repeat_interleave(2, dim=1)
    sc = (q.double() @ kk.transpose(-1, -2)) * 0.25
    sc = sc.masked_fill(torch.arange(40)[None, :] > rows[:, None], float("-inf"))
    torch.testing.assert_close(got.double(), sc.softmax(-1), atol=1e-6, rtol=0)
    sub = _explicit_rows(q[:, [1, 2]], k, [1, 2], 2, rows, None, 0.25, 0)
    torch.testing.assert_close(sub, got[:, [1, 2]], atol=1e-7, rtol=0)


def test_span_unions_and_response_rule():
    fm = FusedModel(tiny_hf_model("llama"))
    ids = _ids(40, seed=17)
    s = fm.score_spans(ids, response=(30, 40), spans={"a": (2, 8), "b": (8, 12), "ab": [(2, 8), (6, 12)]})
    torch.testing.assert_close(s["ab"], s["a"] + s["b"], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="response starts"):
        fm.contextual_scores(ids, relevant=(25, 35), response=(30, 40))
    with pytest.raises(ValueError, match="empty list"):
        fm.contextual_scores(ids, relevant=[], response=(30, 40))


@pytest.mark.slow
def test_smollm_scores_match_hf_eager():
    from transformers import AutoModelForCausalLM

    from focuslens.core.models import ensure_default_checkpoint

    fm = load_fused()
    assert fm.n_layers == 30 and fm.n_heads == 9 and fm.n_kv_heads == 3
    ids = _ids(96, seed=6, vocab=49152)
    spans = {"relevant": (10, 50), "sink": (0, 1)}
    got = fm.score_spans(ids, response=(80, 96), spans={"relevant": (10, 50)})
    eager = AutoModelForCausalLM.from_pretrained(ensure_default_checkpoint(), attn_implementation="eager")
    ref = _eager_reference(eager, ids, (80, 96), spans)
    for k in spans:
        torch.testing.assert_close(got[k], ref[k], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_smollm_scores_match_scoring_module(smollm):
    scoring = pytest.importorskip("focuslens.score.contextual", reason="focuslens.score.contextual not landed yet")
    ids = _ids(96, seed=6, vocab=49152)
    ref = scoring.contextual_scores(smollm, ids, relevant=(10, 50), response=(80, 96))
    got = load_fused().contextual_scores(ids, relevant=(10, 50), response=(80, 96))
    torch.testing.assert_close(got, torch.as_tensor(ref).float().cpu(), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------ split softmax


def test_split_softmax_identity_at_tau_one_and_changes_logits():
    fm = FusedModel(tiny_hf_model("llama"))
    ids = _ids(32, seed=7)[None]
    with torch.no_grad():
        base = fm(ids).logits
        with fm.split_softmax([(0, 1), (1, 3)], span=(3, 12), tau=1.0):
            same = fm(ids).logits
        with fm.split_softmax([(0, 1), (1, 3)], span=(3, 12), tau=0.2):
            edited = fm(ids).logits
    torch.testing.assert_close(same, base, atol=1e-5, rtol=0)
    assert (edited - base).abs().max() > 1e-2


def test_split_softmax_other_heads_bit_identical():
    fm = FusedModel(tiny_hf_model("llama"))
    ids = _ids(32, seed=8)[None]
    seen = {}
    o_proj = fm._attn_modules[1].o_proj
    h = o_proj.register_forward_pre_hook(lambda mod, args: seen.__setitem__(len(seen), args[0].clone()))
    try:
        with torch.no_grad():
            fm(ids)  # plain SDPA
            with fm.split_softmax([(1, 2)], span=(3, 12), tau=0.2):
                fm(ids)
    finally:
        h.remove()
    z0, z1 = (seen[i].view(1, 32, 4, 16) for i in (0, 1))
    for head in (0, 1, 3):
        assert torch.equal(z0[:, :, head], z1[:, :, head])
    assert (z0[:, :, 2] - z1[:, :, 2]).abs().max() > 1e-3


def _tl_split_hooks(span, tau, heads):
    by_layer = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)

    def make(hs):
        def fn(pattern, hook):  # [b, H, q, k]
            pattern = pattern.clone()
            pattern[:, hs] = _split_ref(pattern[:, hs], span, tau)
            return pattern

        return fn

    return [(f"blocks.{l}.attn.hook_pattern", make(hs)) for l, hs in by_layer.items()]


def test_split_softmax_matches_bridge_logits_and_generation(tiny_llama):
    fm = FusedModel(tiny_hf_model("llama"))
    ids = _ids(24, seed=9)
    heads, span, tau = [(0, 0), (1, 1), (1, 3)], (2, 10), 0.25
    with attach_hooks(tiny_llama, _tl_split_hooks(span, tau, heads)):
        with torch.no_grad():
            ref_logits = tiny_llama(ids[None])
        ref_gen = tiny_llama.generate(ids[None], max_new_tokens=6, do_sample=False, verbose=False, use_past_kv_cache=True)
    with fm.split_softmax(heads, span=span, tau=tau):
        with torch.no_grad():
            got_logits = fm(ids[None]).logits
        gen_cached = fm.generate(ids[None], max_new_tokens=6, do_sample=False)
        gen_nocache = fm.generate(ids[None], max_new_tokens=6, do_sample=False, use_cache=False)
    torch.testing.assert_close(got_logits, ref_logits, atol=ATOL, rtol=0)
    assert torch.equal(gen_cached, gen_nocache)
    assert torch.equal(gen_cached.cpu(), torch.as_tensor(ref_gen).cpu())
    plain = fm.generate(ids[None], max_new_tokens=6, do_sample=False)
    assert plain.shape == gen_cached.shape


def test_decode_step_edit_matches_full_recompute():
    """At a decoding step (1 query row, span in absolute key positions) the edited last-row logits
    equal those of a full forward over the whole sequence."""
    fm = FusedModel(tiny_hf_model("qwen2"))
    ids = _ids(20, seed=10)[None]
    with fm.split_softmax([(0, 2), (1, 0)], span=(4, 9), tau=0.1), torch.no_grad():
        out = fm(ids[:, :-1], use_cache=True)
        step = fm(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
        full = fm(ids).logits[:, -1]
    torch.testing.assert_close(step, full, atol=ATOL, rtol=0)


def test_scores_under_split_softmax_see_the_edited_pattern():
    """Score of an edited head = mean over response rows of π_t^τ (π from the unedited pattern)."""
    fm = FusedModel(tiny_hf_model("llama"))
    ids = _ids(40, seed=11)
    span, resp, tau = (3, 15), (30, 40), 0.3
    eager = _eager("llama")
    with torch.no_grad():
        att = eager(ids[None], output_attentions=True).attentions
    pi = att[1][0, 2, resp[0] : resp[1], span[0] : span[1]].sum(-1)
    with fm.split_softmax([(1, 2)], span=span, tau=tau):
        s = fm.contextual_scores(ids, relevant=span, response=resp)
    base = fm.contextual_scores(ids, relevant=span, response=resp)
    torch.testing.assert_close(s[1, 2], (pi**tau).mean(), atol=ATOL, rtol=0)
    mask = torch.ones_like(s, dtype=torch.bool)
    mask[1, 2] = False
    torch.testing.assert_close(s[mask], base[mask], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------- query vectors


def test_inject_vectors_matches_bridge_rot_q(tiny_llama):
    fm = FusedModel(tiny_hf_model("llama"))
    ids = _ids(24, seed=12)
    g = torch.Generator().manual_seed(0)
    vecs = {(0, 1): torch.randn(16, generator=g), (1, 2): torch.randn(16, generator=g), (1, 3): torch.randn(16, generator=g)}
    alpha = 0.7

    def make(layer):
        def fn(q, hook):  # [b, p, H, d] post-RoPE
            q = q.clone()
            for (l, h), v in vecs.items():
                if l == layer:
                    q[:, :, h] += alpha * v
            return q

        return fn

    with attach_hooks(tiny_llama, [(f"blocks.{l}.attn.hook_rot_q", make(l)) for l in (0, 1)]):
        with torch.no_grad():
            ref = tiny_llama(ids[None])
        ref_gen = tiny_llama.generate(ids[None], max_new_tokens=6, do_sample=False, verbose=False, use_past_kv_cache=True)
    with torch.no_grad():
        base = fm(ids[None]).logits
        with fm.inject_vectors(vecs, alpha=0.0):
            zero = fm(ids[None]).logits
    with fm.inject_vectors(vecs, alpha=alpha):
        with torch.no_grad():
            got = fm(ids[None]).logits
        gen = fm.generate(ids[None], max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(zero, base, atol=1e-6, rtol=0)
    assert (got - base).abs().max() > 1e-2
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert torch.equal(gen.cpu(), torch.as_tensor(ref_gen).cpu())


def test_nested_contexts_compose():
    """Injection + split softmax together equal the bridge with both hooks."""
    fm = FusedModel(tiny_hf_model("llama"))
    ids = _ids(20, seed=13)[None]
    v = {(1, 1): torch.randn(16, generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        with fm.inject_vectors(v, alpha=1.0):
            with fm.split_softmax([(1, 1)], span=(2, 8), tau=0.5):
                both = fm(ids).logits
            assert fm.attn_implementation == ATTN_IMPL
            only_inj = fm(ids).logits
    assert fm.attn_implementation == "sdpa" and not is_registered()
    assert (both - only_inj).abs().max() > 1e-4


# ------------------------------------------------------------------------------ hygiene and errors


def test_restores_attention_implementation_after_exceptions():
    m = tiny_hf_model("llama")
    fm = FusedModel(m)
    assert fm.attn_implementation == "sdpa"
    with pytest.raises(KeyError):
        with fm.split_softmax([(0, 0)], span=(1, 3), tau=0.5):
            assert fm.attn_implementation == ATTN_IMPL and is_registered()
            raise KeyError("boom")
    assert fm.attn_implementation == "sdpa" and m.model.config._attn_implementation == "sdpa"
    assert not is_registered() and ATTN_IMPL not in AttentionInterface._global_mapping
    assert not fm._span_edits and not fm._injections and not fm._ablations and fm._recorder is None
    # a failing scoring pass (out-of-vocabulary id) leaves nothing behind either
    with pytest.raises(Exception):
        fm.contextual_scores(torch.tensor([1, 2, 10_000, 3]), relevant=(0, 2), response=(2, 4))
    assert fm.attn_implementation == "sdpa" and not is_registered() and fm._recorder is None


def test_eager_model_keeps_its_implementation():
    m = _eager("llama")
    fm = FusedModel(m)
    ids = _ids(16, seed=14)
    fm.contextual_scores(ids, relevant=(1, 5), response=(10, 16))
    assert fm.attn_implementation == "eager"


def test_validation_errors():
    fm = FusedModel(tiny_hf_model("llama"))
    ids = _ids(16)
    with pytest.raises(ValueError, match="outside"):
        fm.contextual_scores(ids, relevant=(0, 20), response=(10, 16))
    with pytest.raises(ValueError, match="empty"):
        fm.contextual_scores(ids, relevant=(3, 3), response=(10, 16))
    with pytest.raises(ValueError, match="one sequence"):
        fm.contextual_scores(torch.stack([ids, ids]), relevant=(0, 2), response=(10, 16))
    with pytest.raises(ValueError, match="Unknown head"):
        with fm.split_softmax([(2, 0)], span=(0, 3), tau=0.5):
            pass
    with pytest.raises(ValueError, match="tau"):
        with fm.split_softmax([(1, 0)], span=(0, 3), tau=-1):
            pass
    with pytest.raises(ValueError, match="shape"):
        with fm.inject_vectors({(1, 0): torch.zeros(15)}, alpha=1):
            pass
    with pytest.raises(ValueError, match="spans is empty"):
        fm.score_spans(ids, response=(10, 16), spans={}, sink=None)
    with pytest.raises(ValueError, match="reserved"):
        fm.score_spans(ids, response=(10, 16), spans={"sink": (0, 1)})
    with pytest.raises(TypeError):
        FusedModel(object())
    assert fm.attn_implementation == "sdpa" and not is_registered()


# ------------------------------------------------------- against the TransformerLens-path modules


def test_split_softmax_matches_interventions_module(tiny_llama):
    interventions = pytest.importorskip("focuslens.intervene.eager")
    fm = FusedModel(tiny_hf_model("llama"))
    ids = _ids(28, seed=15)
    heads, span, tau = [(0, 2), (1, 0)], (3, 11), 0.3
    with interventions.split_softmax(tiny_llama, heads, span, tau):
        with torch.no_grad():
            ref = tiny_llama(ids[None])
        ref_gen = tiny_llama.generate(ids[None], max_new_tokens=5, do_sample=False, verbose=False, use_past_kv_cache=True)
    with fm.split_softmax(heads, span=span, tau=tau):
        with torch.no_grad():
            got = fm(ids[None]).logits
        gen = fm.generate(ids[None], max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert torch.equal(gen.cpu(), torch.as_tensor(ref_gen).cpu())


def test_inject_vectors_matches_interventions_module(tiny_llama):
    interventions = pytest.importorskip("focuslens.intervene.eager")
    fm = FusedModel(tiny_hf_model("llama"))
    ids = _ids(20, seed=16)
    g = torch.Generator().manual_seed(3)
    vecs = {(0, 3): torch.randn(16, generator=g), (1, 1): torch.randn(16, generator=g)}
    with interventions.inject_vectors(tiny_llama, vecs, alpha=0.5):
        with torch.no_grad():
            ref = tiny_llama(ids[None])
    with fm.inject_vectors(vecs, alpha=0.5), torch.no_grad():
        got = fm(ids[None]).logits
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_load_fused_from_folder_with_device_map(tmp_path, tok):
    """load_fused on a checkpoint folder, through accelerate's device_map (all on CPU here)."""
    tiny_hf_model("qwen2").save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    fm = load_fused(tmp_path, device_map={"": "cpu"})
    assert fm.attn_implementation == "sdpa" and fm.n_kv_heads == 2
    ids = _ids(30, seed=18)
    ref = FusedModel(tiny_hf_model("qwen2")).contextual_scores(ids, relevant=(2, 9), response=(20, 30))
    torch.testing.assert_close(fm.contextual_scores(ids, relevant=(2, 9), response=(20, 30)), ref, atol=1e-6, rtol=0)


def test_two_wrappers_on_one_model():
    m = tiny_hf_model("llama")
    a, b = FusedModel(m), FusedModel(m)
    ids = _ids(20, seed=19)
    sa = a.contextual_scores(ids, relevant=(1, 6), response=(14, 20))  # a re-owns the modules
    sb = b.contextual_scores(ids, relevant=(1, 6), response=(14, 20))
    torch.testing.assert_close(sa, sb)
    with a.split_softmax([(0, 0)], span=(1, 6), tau=0.5):
        with pytest.raises(RuntimeError, match="Another FusedModel"):
            b.contextual_scores(ids, relevant=(1, 6), response=(14, 20))
    assert a.attn_implementation == "sdpa" and not is_registered()


def test_public_contextual_scores_dispatches_to_the_fused_backend(tok):
    """`fl.contextual_scores` takes a FusedModel as well as a bridge and gives the same numbers."""
    import focuslens as fl
    from focuslens.testing import tiny_hf_model

    hf = tiny_hf_model("llama", seed=5)
    bridge = fl.load_model(hf, tokenizer=tok)
    fm = FusedModel(tiny_hf_model("llama", seed=5), tok)
    ids = torch.tensor(tok("The capital of Veloria is Quentor. The capital of Marn is Pell. Pell").input_ids)
    n = len(ids)
    a = fl.contextual_scores(fm, ids, relevant=(1, 8), response=(n - 2, n))
    b = fl.contextual_scores(bridge, ids, relevant=(1, 8), response=(n - 2, n))
    assert a.shape == b.shape == (2, 4)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------ one protocol with the TransformerLens path


def test_score_spans_returns_the_scoring_result_type(tiny_llama):
    """FusedModel.score_spans = focuslens.score_spans: same HeadScores names, columns and numbers."""
    import focuslens as fl

    fm = FusedModel(tiny_hf_model("llama"))
    ids = _ids(48, seed=21)
    kw = dict(response=(40, 48), spans={"relevant": (5, 12), "u": [(1, 3), (20, 24)]},
              distractors=[(12, 20), (24, 33)])
    got = fm.score_spans(ids, **kw)
    ref = fl.score.score_spans(tiny_llama, ids, **kw)
    via = fl.score.score_spans(fm, ids, **kw)  # the public function dispatches to the backend
    assert isinstance(got, HeadScores) and set(got.names) == set(ref.names)
    assert "sink" in got.names and "distractors_max" in got.names
    torch.testing.assert_close(got.columns, ref.columns, atol=ATOL, rtol=0)
    for name in ref.names:
        torch.testing.assert_close(got[name], ref[name], atol=ATOL, rtol=0)
        torch.testing.assert_close(via[name], got[name], atol=0, rtol=0)
    torch.testing.assert_close(got.mass((5, 12)), got.relevant)


def test_sliding_window_scores_match_hf_eager():
    """Gemma-3 (window 8 on layer 0, QK-norm, query_pre_attn_scalar) with a prompt longer than the window."""
    fm = FusedModel(tiny_hf_model("gemma3"))
    ids = _ids(30, seed=22)
    spans = {"relevant": (2, 10), "near": (18, 24)}
    got = fm.score_spans(ids, response=(24, 30), spans=spans, sink=(0, 1))
    spans["sink"] = (0, 1)
    ref = _eager_reference(_eager("gemma3"), ids, (24, 30), spans)
    for k in spans:
        torch.testing.assert_close(got[k], ref[k], atol=ATOL, rtol=0)
    assert float(got.relevant[0].abs().max()) == 0.0 and float(got.relevant[1].min()) > 0  # the window acts


def test_sliding_window_split_softmax_matches_bridge(tiny_gemma3):
    """Split softmax on a sliding-window layer: the fused backend's edit = the bridge's hook_pattern edit."""
    from focuslens.intervene.eager import split_softmax

    fm = FusedModel(tiny_hf_model("gemma3"))
    ids = _ids(30, seed=23)
    heads, spans, tau = [(0, 1), (1, 2)], [(14, 20), (3, 6)], 0.3
    with split_softmax(tiny_gemma3, heads, spans, tau), torch.no_grad():
        ref = tiny_gemma3(ids[None])
    with fm.split_softmax(heads, spans, tau), torch.no_grad():
        got = fm(ids[None]).logits
    with torch.no_grad():
        base = fm(ids[None]).logits
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert (got - base).abs().max() > 1e-3


def test_handles_are_context_managers_and_removable(tiny_llama):
    """split_softmax / inject_vectors return handles (.remove(), with-block), positional or keyword."""
    from focuslens.core.hooks import HookHandle
    from focuslens.intervene.eager import compose

    fm = FusedModel(tiny_hf_model("llama"))
    ids = _ids(24, seed=24)[None]
    with torch.no_grad():
        base = fm(ids).logits
        h = fm.split_softmax([(1, 2)], [(2, 6), (8, 10)], 0.2)
        assert isinstance(h, HookHandle) and h.active and fm.attn_implementation == ATTN_IMPL
        edited = fm(ids).logits
        h.remove()
        h.remove()  # idempotent
        assert not h.active and fm.attn_implementation == "sdpa" and not is_registered() and not fm._span_edits
        with fm.split_softmax([(1, 2)], span=[(2, 6), (8, 10)], tau=0.2) as h2:
            again = fm(ids).logits
        assert not h2.active
        v = {(1, 1): torch.randn(16, generator=torch.Generator().manual_seed(2))}
        both = compose(fm.inject_vectors(v, alpha=1.0), fm.split_softmax([(1, 2)], (2, 6), 0.5))
        fm(ids)
        both.remove()
        assert not fm._injections and not fm._span_edits and not is_registered()
    assert (edited - base).abs().max() > 1e-3
    torch.testing.assert_close(again, edited, atol=0, rtol=0)
