"""The fused engine: a bridge's interventions on Hugging Face SDPA, equal to the eager bridge path.

For every spec the engine expresses (split softmax, PASTA, post-RoPE injection, fixed-α steering,
zero/mean ablation, compositions) on tiny Llama (GQA + RoPE) and Qwen2: prefill and cached decoding
logits of a left-padded batch equal the bridge's to 1e-5 (fp32), identities are bit-exact, untouched
heads bit-identical, the attention implementation restored also after an exception, and
``evaluate(engine="fused")`` answers == ``evaluate(engine="eager")`` answers, batched == batch 1.
Models the engine does not cover (GPT-2) and specs without a fused edit fall back (``"auto"``) or are
refused with the reason (``"fused"``).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

from focuslens.core.errors import UsageError
from focuslens.core.forward import forward_with_cache
from focuslens.testing import greedy_steps, random_directions, random_head_means
from focuslens.core.generation import greedy_generate_batch, left_pad, left_pad_offsets
from focuslens.core.hooks import attach_hooks, count_hooks
from focuslens.core.models import hook_name, model_info
from focuslens.directions import FocusDirections
from focuslens.directions.artefact import Steer
from focuslens.engine import ATTN_IMPL, engine_for, engine_refusal, is_registered, resolve_engine
from focuslens.evaluation.runner import evaluate
from focuslens.intervene.label_free import PositionalCalibration, SelfLocatedSpan, SinkRedistribution, Temperature
from focuslens.intervene.span_specs import Pasta, SplitSoftmax
from focuslens.intervene.specs import Ablate, Compose, NoIntervention
from focuslens.intervene.vector_specs import InjectVectors
from focuslens.tasks import make_synthetic_qa, render

ATOL = 1e-5
N_STEPS = 4


@pytest.fixture(scope="module")
def examples():
    return make_synthetic_qa(4, n_docs=3, seed=1, doc_sentences=1)


def _rendered(model, examples):
    rs = [render(e, model) for e in examples]
    assert len({len(r) for r in rs}) > 1 and len({r.relevant.start for r in rs}) > 1  # padding, own spans
    return rs


def _padded(rs):
    return left_pad([r.tokens for r in rs])


def _decode(forward, ids, mask, n=N_STEPS):
    """Greedy cached steps: (tokens [b, n], logits [b, n, vocab]) with the given forward pass."""
    return greedy_steps(None, ids, mask, n, forward=forward)


def _bridge_forward(model):
    return lambda t, c=None, **kw: forward_with_cache(model, t, c, **kw)


def _dirs(model, heads=((1, 2), (0, 1), (1, 3)), seed=0) -> FocusDirections:
    return random_directions(model, heads, seed=seed)


def _means(model, heads, seed=1):
    return random_head_means(model, heads, seed=seed)


def _specs(model):
    info = model_info(model)
    g = torch.Generator().manual_seed(3)
    vecs = {(1, 1): torch.randn(info.d_head, generator=g) * 2, (0, 3): torch.randn(info.d_head, generator=g) * 2}
    return {
        "split": SplitSoftmax([(1, 2), (0, 1), (1, 0)], tau=0.2),
        "pasta": Pasta([(1, 2), (0, 3)], coefficient=0.05),
        "inject": InjectVectors(vecs, alpha=0.7),
        "steer": Steer(_dirs(model), alpha=0.5),
        "ablate_zero": Ablate([(1, 2), (0, 0)]),
        "ablate_mean": Ablate([(1, 3)], mode="mean", means=_means(model, [(1, 3)])),
        "compose": SplitSoftmax([(1, 2)], tau=0.3) + InjectVectors(vecs, alpha=0.5) + Ablate([(0, 2)]),
    }


SPEC_NAMES = ["split", "pasta", "inject", "steer", "ablate_zero", "ablate_mean", "compose"]


# ------------------------------------------------------------------------------------------ the engine


def test_engine_shares_the_bridge_weights_and_leaves_the_bridge_eager(tiny_llama):
    fm = engine_for(tiny_llama)
    assert engine_for(tiny_llama) is fm  # cached per bridge
    assert fm.hooked is tiny_llama and fm.attn_implementation == "sdpa"
    bridge_ptrs = {p.data_ptr() for p in tiny_llama.original_model.parameters()}
    assert {p.data_ptr() for p in fm.hf_model.parameters()} <= bridge_ptrs  # nothing copied
    assert tiny_llama.original_model.config._attn_implementation == "eager"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_unmodified_logits_match_the_bridge(arch, request, examples):
    """Also on Gemma-3 (a sliding window of 8, decoded past it): the engine runs the model's own masks."""
    model = request.getfixturevalue(f"tiny_{arch}")
    ids, mask, _ = _padded(_rendered(model, examples))
    fm = engine_for(model)
    t_e, l_e = _decode(_bridge_forward(model), ids, mask)
    t_f, l_f = _decode(fm.forward_with_cache, ids, mask)
    torch.testing.assert_close(l_f, l_e, atol=ATOL, rtol=0)
    assert torch.equal(t_f, t_e)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_spec_logits_match_the_bridge_batched_with_cache(tiny_llama, examples, name):
    """Prefill and every cached step of a left-padded batch, each row its own span: engine == bridge."""
    spec = _specs(tiny_llama)[name]
    assert spec.fused
    rs = _rendered(tiny_llama, examples)
    ids, mask, offsets = _padded(rs)
    fm = engine_for(tiny_llama)
    _, base = _decode(fm.forward_with_cache, ids, mask)
    with spec.attach_batch(tiny_llama, rs, offsets=offsets):
        t_e, l_e = _decode(_bridge_forward(tiny_llama), ids, mask)
    with fm.attached(spec, rs, offsets):
        t_f, l_f = _decode(fm.forward_with_cache, ids, mask)
    torch.testing.assert_close(l_f, l_e, atol=ATOL, rtol=0)
    assert torch.equal(t_f, t_e)
    assert (l_f - base).abs().max() > 1e-3  # the intervention did something
    assert count_hooks(tiny_llama) == 0 and not is_registered() and fm.attn_implementation == "sdpa"


@pytest.mark.parametrize("row_block", [1, 7])
def test_row_blocks_with_left_padding_match_the_bridge(tiny_llama, examples, row_block):
    """Small row blocks (each computes only the keys its rows can see) under left padding: still exact."""
    spec = _specs(tiny_llama)["compose"]
    rs = _rendered(tiny_llama, examples)
    ids, mask, offsets = _padded(rs)
    fm = engine_for(tiny_llama)
    with spec.attach_batch(tiny_llama, rs, offsets=offsets):
        _, l_e = _decode(_bridge_forward(tiny_llama), ids, mask)
    saved, fm.row_block = fm.row_block, row_block
    try:
        with fm.attached(spec, rs, offsets):
            _, l_f = _decode(fm.forward_with_cache, ids, mask)
    finally:
        fm.row_block = saved
    torch.testing.assert_close(l_f, l_e, atol=ATOL, rtol=0)


def test_split_softmax_matches_the_bridge_on_qwen2(tiny_qwen2, examples):
    spec = SplitSoftmax([(1, 2), (0, 1)], tau=0.2)
    rs = _rendered(tiny_qwen2, examples)
    ids, mask, offsets = _padded(rs)
    fm = engine_for(tiny_qwen2)
    with spec.attach_batch(tiny_qwen2, rs, offsets=offsets):
        _, l_e = _decode(_bridge_forward(tiny_qwen2), ids, mask)
    with fm.attached(spec, rs, offsets):
        _, l_f = _decode(fm.forward_with_cache, ids, mask)
    torch.testing.assert_close(l_f, l_e, atol=ATOL, rtol=0)


@pytest.mark.parametrize("spec", [SplitSoftmax([(1, 2), (0, 1)], tau=1.0), Pasta([(1, 2)], coefficient=1.0),
                                  InjectVectors({(1, 1): torch.ones(16) * 5}, alpha=0.0),
                                  NoIntervention(), Compose()])
def test_identities_are_bit_exact(tiny_llama, examples, spec):
    rs = _rendered(tiny_llama, examples)
    ids, mask, offsets = _padded(rs)
    fm = engine_for(tiny_llama)
    t0, l0 = _decode(fm.forward_with_cache, ids, mask)
    with fm.attached(spec, rs, offsets):
        t1, l1 = _decode(fm.forward_with_cache, ids, mask)
    assert torch.equal(l1, l0) and torch.equal(t1, t0)


def _head_outputs(fm, ids, mask):
    """Each layer's attention output per head (the input of o_proj, ``hook_z``): {layer: [b, p, H, d]}."""
    got, handles = {}, []
    for i, m in enumerate(fm._attn_modules):
        def pre(mod, args, i=i):
            x = args[0]
            got[i] = x.reshape(*x.shape[:2], fm.n_heads, fm.d_head).clone()
        handles.append(m.o_proj.register_forward_pre_hook(pre))
    try:
        fm.forward_with_cache(ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.mark.parametrize("name", ["split", "pasta", "ablate_zero"])
def test_untouched_heads_are_bit_identical(tiny_llama, examples, name):
    """Only the last layer is edited, so everything before it and its other heads are bit for bit the same."""
    heads = [(1, 2)]
    spec = {"split": SplitSoftmax(heads, tau=0.2), "pasta": Pasta(heads, coefficient=0.05),
            "ablate_zero": Ablate(heads)}[name]
    rs = _rendered(tiny_llama, examples)
    ids, mask, offsets = _padded(rs)
    fm = engine_for(tiny_llama)
    ref = _head_outputs(fm, ids, mask)
    with fm.attached(spec, rs, offsets):
        got = _head_outputs(fm, ids, mask)
    assert torch.equal(got[0], ref[0])
    others = [h for h in range(fm.n_heads) if h != 2]
    assert torch.equal(got[1][:, :, others], ref[1][:, :, others])
    assert not torch.equal(got[1][:, :, 2], ref[1][:, :, 2])


def test_attention_implementation_restored_after_an_exception(tiny_llama, examples):
    rs = _rendered(tiny_llama, examples)
    ids, mask, offsets = _padded(rs)
    fm = engine_for(tiny_llama)
    spec = _specs(tiny_llama)["compose"]
    with pytest.raises(KeyError):
        with fm.attached(spec, rs, offsets):
            assert fm.attn_implementation == ATTN_IMPL and is_registered()
            raise KeyError("boom")
    assert fm.attn_implementation == "sdpa" and not is_registered() and ATTN_IMPL not in AttentionInterface._global_mapping
    assert not fm._span_edits and not fm._injections and not fm._ablations
    assert tiny_llama.original_model.config._attn_implementation == "eager"
    # a batch of the wrong size fails inside the forward pass; still nothing left behind
    with pytest.raises(ValueError, match="batch"):
        with fm.attached(spec, rs[:2], offsets[:2]):
            fm.forward_with_cache(ids, attention_mask=mask)
    assert fm.attn_implementation == "sdpa" and not fm._span_edits and not is_registered()


# ------------------------------------------------------------------------------------------ evaluate


@pytest.mark.parametrize("name", ["none"] + SPEC_NAMES)
def test_evaluate_fused_answers_equal_eager_answers(tiny_llama, examples, name):
    spec = None if name == "none" else _specs(tiny_llama)[name]
    rs = _rendered(tiny_llama, examples)
    kw = dict(intervene=spec, progress=False, max_new_tokens=6, stop_at_newline=False)
    eager = evaluate(tiny_llama, rs, engine="eager", batch_size=3, **kw)
    fused = evaluate(tiny_llama, rs, engine="fused", batch_size=3, **kw)
    one = evaluate(tiny_llama, rs, engine="fused", batch_size=1, **kw)
    assert fused.predictions == eager.predictions == one.predictions
    assert fused.config_hash == eager.config_hash  # the engine is not part of the records' identity
    assert {r["engine"] for r in fused.records} == {"fused"} and {r["engine"] for r in eager.records} == {"eager"}
    auto = evaluate(tiny_llama, rs, batch_size=3, **kw)
    assert {r["engine"] for r in auto.records} == {"fused"}
    assert count_hooks(tiny_llama) == 0 and not is_registered()


def test_evaluate_fused_tokens_match_bridge_generation(tiny_llama, examples):
    """The engine decodes with the library's loop (one stop rule): same tokens as the bridge's batch."""
    rs = _rendered(tiny_llama, examples)
    prompts = [r.tokens for r in rs]
    fm = engine_for(tiny_llama)
    spec = _specs(tiny_llama)["split"]
    with spec.attach_batch(tiny_llama, rs, offsets=left_pad_offsets(prompts)):
        ref = greedy_generate_batch(tiny_llama, prompts, max_new_tokens=8, stop_at_newline=False, stop_ids=[])
    with fm.attached(spec, rs, left_pad_offsets(prompts)):
        got = greedy_generate_batch(tiny_llama, prompts, max_new_tokens=8, stop_at_newline=False, stop_ids=[],
                                    forward=fm.forward_with_cache)
    assert got == ref


def test_auto_falls_back_and_fused_refuses_with_the_reason(tiny_llama, tiny_gpt2, tiny_gemma3, examples):
    rs = _rendered(tiny_llama, examples)[:2]
    kw = dict(progress=False, max_new_tokens=3)
    # a model the engine does not cover (GPT-2: no q_proj/o_proj)
    assert "does not cover" in engine_refusal(tiny_gpt2, None)
    assert resolve_engine(tiny_gpt2, None, "auto") is None
    with pytest.raises(UsageError, match="engine='fused'"):
        evaluate(tiny_gpt2, [render(e, tiny_gpt2) for e in make_synthetic_qa(1, n_docs=2, seed=2)],
                 engine="fused", **kw)
    gpt = evaluate(tiny_gpt2, [render(e, tiny_gpt2) for e in make_synthetic_qa(1, n_docs=2, seed=2)], **kw)
    assert {r["engine"] for r in gpt.records} == {"eager"}
    # edits on a sliding-window model (the explicit rows assume every key of the cache)
    assert engine_refusal(tiny_gemma3, None) is None
    assert "sliding window" in engine_refusal(tiny_gemma3, SplitSoftmax([(1, 1)], tau=0.2))
    # specs without a fused edit
    for spec in (InjectVectors({(1, 1): torch.ones(16)}, site="key"),
                 InjectVectors({(1, 1): torch.ones(16)}, pre_rope=True),
                 SplitSoftmax([(1, 2)], tau=0.2) + InjectVectors({(1, 1): torch.ones(16)}, site="key")):
        assert not spec.fused and "no fused edit" in engine_refusal(tiny_llama, spec)
        with pytest.raises(UsageError, match="no fused edit"):
            resolve_engine(tiny_llama, spec, "fused")
    # a callable intervention, and hooks the engine would not run
    assert resolve_engine(tiny_llama, lambda r: NoIntervention().attach(tiny_llama), "auto") is None
    with attach_hooks(tiny_llama, [(hook_name(0, "hook_z"), lambda z, hook: z)], label="user hook"):
        assert "hooks are attached" in engine_refusal(tiny_llama, None)
        res = evaluate(tiny_llama, rs, **kw)
        assert {r["engine"] for r in res.records} == {"eager"}
    with pytest.raises(ValueError, match="engine must be one of"):
        evaluate(tiny_llama, rs, engine="sdpa", **kw)
    assert resolve_engine(tiny_llama, None, "eager") is None


def test_engine_sees_in_place_weight_edits_and_rebuilds_on_replaced_parameters(tok):
    from focuslens.testing import tiny_model

    model = tiny_model("llama", seed=5)
    fm = engine_for(model)
    ids = torch.randint(1, 300, (1, 12))
    p = next(model.original_model.parameters())
    with torch.no_grad():
        p.mul_(1.5)  # in place: the engine shares the tensor
    torch.testing.assert_close(fm.forward_with_cache(ids)[0], forward_with_cache(model, ids)[0], atol=ATOL, rtol=0)
    name, param = next(iter(model.original_model.named_parameters()))
    owner, _, leaf = name.rpartition(".")
    model.original_model.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(param.detach() * 0.5,
                                                                                     requires_grad=False)
    fm2 = engine_for(model)
    assert fm2 is not fm
    torch.testing.assert_close(fm2.forward_with_cache(ids)[0], forward_with_cache(model, ids)[0], atol=ATOL, rtol=0)


def test_benchmark_dry_run(load_script):
    """benchmarks/bench_engine.py on a tiny model: every path runs, bridge and engine answers agree."""
    res = load_script("benchmarks/bench_engine.py").main(["--dry-run"])
    assert [s["intervention"] for s in res["settings"]] == ["unmodified", "split_softmax_top4"]
    for s in res["settings"]:
        assert s["answers_differ"] == 0 and s["hf_answers_differ_from_engine_unmodified"] == 0
        assert s["bridge_s"] > 0 and s["engine_s"] > 0 and s["hf_s"] > 0


# ------------------------------------------------------------------------------------------ label-free specs


def _label_free_specs(model):
    """Issue #36's specs and alpha='auto' steering, each at a non-neutral setting, on the engine."""
    heads = [(0, 1), (1, 2), (1, 0)]
    return {
        "sink": SinkRedistribution(heads, rho=0.6),
        "sink_k2": SinkRedistribution(heads, rho=0.9, sink_tokens=2),
        "temperature": Temperature(heads, factor=2.5),
        "ssmax": Temperature([(1, 2), (0, 3), (1, 0)], factor=0.3, form="log_length"),
        "calibration": PositionalCalibration(heads, temperature=2e-4),
        "calibration_half": PositionalCalibration([(1, 3), (0, 2)], temperature=1e-3, strength=0.5, query="question"),
        "located": SelfLocatedSpan(SplitSoftmax(heads, 0.1)),
        "located_pasta_top2": SelfLocatedSpan(Pasta(heads, coefficient=0.02), top=2, query="last", n_last=4,
                                              baseline="dummy"),
        "steer_auto": Steer(_dirs(model), alpha="auto", alpha_max=3.0),
        "steer_auto_input": Steer(_dirs(model), alpha="auto", per="input", target=0.3),
        # alpha='auto' probes with the members before it attached (on the bridge), as attach_batch does
        "compose_auto": SplitSoftmax([(1, 2)], tau=0.3) + Steer(_dirs(model), alpha="auto"),
        "compose_label_free": (SelfLocatedSpan(Pasta([(1, 1)], coefficient=0.05)) + Temperature([(0, 2)], factor=3.0)
                               + SinkRedistribution([(1, 2)], rho=0.5)),
        # measuring members after others: each row measured alone under the members before it (both engines)
        "compose_measuring": (Temperature([(0, 1)], factor=2.0) + SelfLocatedSpan(SplitSoftmax([(1, 2)], 0.2))
                              + PositionalCalibration([(1, 3), (0, 2)], temperature=5e-4)),
    }


LABEL_FREE = ["sink", "sink_k2", "temperature", "ssmax", "calibration", "calibration_half", "located",
              "located_pasta_top2", "steer_auto", "steer_auto_input", "compose_auto", "compose_label_free",
              "compose_measuring"]


@pytest.mark.parametrize("name", LABEL_FREE)
def test_label_free_logits_match_the_bridge_batched_with_cache(tiny_llama, examples, name):
    """Prefill and every cached step of a left-padded batch (each row its own sink, documents, located span,
    α): engine == bridge, the measuring passes on the bridge, only the edit on the engine."""
    spec = _label_free_specs(tiny_llama)[name]
    assert spec.fused and engine_refusal(tiny_llama, spec) is None
    rs = _rendered(tiny_llama, examples)
    ids, mask, offsets = _padded(rs)
    fm = engine_for(tiny_llama)
    _, base = _decode(fm.forward_with_cache, ids, mask)
    with spec.attach_batch(tiny_llama, rs, offsets=offsets):
        t_e, l_e = _decode(_bridge_forward(tiny_llama), ids, mask)
    with fm.attached(spec, rs, offsets):
        t_f, l_f = _decode(fm.forward_with_cache, ids, mask)
    torch.testing.assert_close(l_f, l_e, atol=ATOL, rtol=0)
    assert torch.equal(t_f, t_e)
    assert ((l_f - base).abs().amax(-1) > 1e-4).any(-1).all()  # the intervention changed every row
    assert count_hooks(tiny_llama) == 0 and not is_registered() and fm.attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["ssmax", "calibration", "sink"])
def test_label_free_row_blocks_match_the_bridge(tiny_llama, examples, name):
    """Row blocks of 5: a block's rows see only its keys, and a calibration row block before the last document
    ends (no row sees every document yet) is left as it is."""
    spec = _label_free_specs(tiny_llama)[name]
    rs = _rendered(tiny_llama, examples)
    ids, mask, offsets = _padded(rs)
    fm = engine_for(tiny_llama)
    with spec.attach_batch(tiny_llama, rs, offsets=offsets):
        _, l_e = _decode(_bridge_forward(tiny_llama), ids, mask)
    saved, fm.row_block = fm.row_block, 5
    try:
        with fm.attached(spec, rs, offsets):
            _, l_f = _decode(fm.forward_with_cache, ids, mask)
    finally:
        fm.row_block = saved
    torch.testing.assert_close(l_f, l_e, atol=ATOL, rtol=0)


def test_label_free_specs_match_the_bridge_on_qwen2(tiny_qwen2, examples):
    heads = [(1, 2), (0, 1)]
    rs = _rendered(tiny_qwen2, examples)
    ids, mask, offsets = _padded(rs)
    fm = engine_for(tiny_qwen2)
    for spec in (Temperature(heads, factor=0.4, form="log_length"), PositionalCalibration(heads, temperature=2e-4),
                 SinkRedistribution(heads, rho=0.7)):
        with spec.attach_batch(tiny_qwen2, rs, offsets=offsets):
            _, l_e = _decode(_bridge_forward(tiny_qwen2), ids, mask)
        with fm.attached(spec, rs, offsets):
            _, l_f = _decode(fm.forward_with_cache, ids, mask)
        torch.testing.assert_close(l_f, l_e, atol=ATOL, rtol=0)


@pytest.mark.parametrize("spec", [SinkRedistribution([(1, 2), (0, 1)], rho=0.0), Temperature([(1, 2)], factor=1.0),
                                  PositionalCalibration([(1, 2), (0, 1)], strength=0.0),
                                  SelfLocatedSpan(SplitSoftmax([(1, 2)], 1.0))])
def test_label_free_neutral_settings_are_bit_exact(tiny_llama, examples, spec):
    rs = _rendered(tiny_llama, examples)
    ids, mask, offsets = _padded(rs)
    fm = engine_for(tiny_llama)
    t0, l0 = _decode(fm.forward_with_cache, ids, mask)
    with fm.attached(spec, rs, offsets):
        t1, l1 = _decode(fm.forward_with_cache, ids, mask)
    assert torch.equal(l1, l0) and torch.equal(t1, t0)


@pytest.mark.parametrize("name", ["sink", "temperature", "calibration"])
def test_label_free_untouched_heads_are_bit_identical(tiny_llama, examples, name):
    heads = [(1, 2)]
    spec = {"sink": SinkRedistribution(heads, rho=0.6), "temperature": Temperature(heads, factor=2.5),
            "calibration": PositionalCalibration(heads, temperature=2e-4)}[name]
    rs = _rendered(tiny_llama, examples)
    ids, mask, offsets = _padded(rs)
    fm = engine_for(tiny_llama)
    ref = _head_outputs(fm, ids, mask)
    with fm.attached(spec, rs, offsets):
        got = _head_outputs(fm, ids, mask)
    assert torch.equal(got[0], ref[0])
    others = [h for h in range(fm.n_heads) if h != 2]
    assert torch.equal(got[1][:, :, others], ref[1][:, :, others])
    assert not torch.equal(got[1][:, :, 2], ref[1][:, :, 2])


def test_label_free_restore_after_an_exception_and_need_the_bridge(tiny_llama, examples):
    rs = _rendered(tiny_llama, examples)
    ids, mask, offsets = _padded(rs)
    fm = engine_for(tiny_llama)
    for spec in (_label_free_specs(tiny_llama)["compose_label_free"], PositionalCalibration([(1, 3)])):
        with pytest.raises(ValueError, match="batch"):  # a batch of the wrong size fails inside the forward pass
            with fm.attached(spec, rs[:2], offsets[:2]):
                fm.forward_with_cache(ids, attention_mask=mask)
        assert fm.attn_implementation == "sdpa" and not is_registered()
        assert not fm._span_edits and not fm._score_edits and not fm._injections and count_hooks(tiny_llama) == 0
    # a huge temperature overflows the logits: refused as on the bridge, everything restored
    with pytest.raises(UsageError, match="non-finite"):
        with fm.attached(Temperature([(1, 2)], factor=1e38, form="log_length"), rs, offsets):
            fm.forward_with_cache(ids, attention_mask=mask)
    assert fm.attn_implementation == "sdpa" and not fm._score_edits and not is_registered()
    # an engine built without a bridge cannot run the measuring passes
    from focuslens.engine import FusedModel

    bare = FusedModel(fm.hf_model)
    for spec in (PositionalCalibration([(1, 3)]), SelfLocatedSpan(SplitSoftmax([(1, 2)], 0.2)),
                 Steer(_dirs(tiny_llama), alpha="auto")):
        with pytest.raises(TypeError, match="engine was built for"):
            with bare.attached(spec, rs, offsets):
                pass
    assert not is_registered()


@pytest.mark.parametrize("name", LABEL_FREE)
def test_evaluate_fused_answers_equal_eager_answers_label_free(tiny_llama, examples, name):
    spec = _label_free_specs(tiny_llama)[name]
    rs = _rendered(tiny_llama, examples)
    kw = dict(intervene=spec, progress=False, max_new_tokens=6, stop_at_newline=False)
    eager = evaluate(tiny_llama, rs, engine="eager", batch_size=3, **kw)
    fused = evaluate(tiny_llama, rs, engine="fused", batch_size=3, **kw)
    one = evaluate(tiny_llama, rs, engine="fused", batch_size=1, **kw)
    assert fused.predictions == eager.predictions == one.predictions
    assert fused.config_hash == eager.config_hash
    assert {r["engine"] for r in evaluate(tiny_llama, rs, batch_size=3, **kw).records} == {"fused"}
    if name.startswith("compose"):  # measured under the members before it, each row alone: batch 1 on the bridge too
        assert evaluate(tiny_llama, rs, engine="eager", batch_size=1, **kw).predictions == eager.predictions
    assert count_hooks(tiny_llama) == 0 and not is_registered()
