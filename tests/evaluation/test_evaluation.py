"""Evaluation runner: exact greedy decoding, stopping rules, batching, resumable records, margins."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch

from focuslens.evaluation.runner import EvalResult, evaluate, greedy_generate, greedy_generate_batch
from focuslens.evaluation.runner import RECORD_FORMAT_VERSION
from focuslens.evaluation.margins import teacher_forced_margins
from focuslens.core.hooks import attach_hooks, count_hooks
from focuslens.tasks import make_kv_retrieval, make_synthetic_qa, render
from focuslens.testing import naive_greedy as _naive_greedy


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2", "tiny_qwen2"])
def test_greedy_generate_matches_no_cache_reference(request, arch):
    model = request.getfixturevalue(arch)
    r = render(make_synthetic_qa(1, n_docs=3, seed=0)[0], model)
    ids, text = greedy_generate(model, r.tokens, max_new_tokens=8, stop_at_newline=False, stop_ids=[])
    assert ids == _naive_greedy(model, r.tokens, 8)
    assert text == model.tokenizer.decode(ids)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_batched_generation_equals_one_by_one(request, arch):
    model = request.getfixturevalue(arch)
    rs = [render(e, model) for e in make_synthetic_qa(4, n_docs=3, seed=1, doc_sentences=1)]
    assert len({len(r) for r in rs}) > 1  # different lengths: left padding is exercised
    one = [greedy_generate(model, r.tokens, max_new_tokens=6, stop_at_newline=False, stop_ids=[]) for r in rs]
    bat = greedy_generate_batch(model, [r.tokens for r in rs], max_new_tokens=6, stop_at_newline=False, stop_ids=[])
    assert [b[0] for b in bat] == [o[0] for o in one]


class _ScriptedModel:
    """A fake hooked model that emits a fixed token script, to test the stopping rules exactly."""

    def __init__(self, tok, script):
        self.tokenizer = tok
        self.script = script
        self.calls = 0
        self.cfg = SimpleNamespace(n_layers=1, n_heads=1, d_head=1, d_model=1, n_ctx=100_000, model_name="scripted")
        self.hook_dict = {}

    def __call__(self, tokens, return_type="logits", past_key_values=None, **kw):
        step = self.calls
        self.calls += 1
        logits = torch.zeros(tokens.shape[0], 1, len(self.tokenizer))
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 1.0
        return logits, object()


def test_stopping_rules(tok):
    nl = tok("\n", add_special_tokens=False).input_ids
    word = tok(" City", add_special_tokens=False).input_ids
    assert len(nl) == 1
    eos = tok.eos_token_id
    prompt = torch.tensor([1, 2, 3])
    # A leading newline does not stop; the newline after the answer does (and is kept).
    m = _ScriptedModel(tok, nl + word + nl + word)
    ids, text = greedy_generate(m, prompt, max_new_tokens=20)
    assert ids == nl + word + nl and text.strip() == "City" and m.calls == len(ids)
    # EOS stops and is not included.
    m = _ScriptedModel(tok, word + [eos] + word)
    assert greedy_generate(m, prompt)[0] == word
    # max_new_tokens.
    m = _ScriptedModel(tok, word * 30)
    assert len(greedy_generate(m, prompt, max_new_tokens=5)[0]) == 5
    # Without the newline rule, generation continues past newlines.
    m = _ScriptedModel(tok, word + nl + word + [eos])
    assert greedy_generate(m, prompt, stop_at_newline=False)[0] == word + nl + word
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(m, prompt, max_new_tokens=0)


def test_hooks_fire_at_prefill_and_every_step(tiny_llama):
    r = render(make_synthetic_qa(1, n_docs=2)[0], tiny_llama)
    shapes = []
    fn = lambda x, hook: shapes.append(tuple(x.shape))  # noqa: E731
    with attach_hooks(tiny_llama, [("blocks.0.attn.hook_pattern", fn)]):
        ids, _ = greedy_generate(tiny_llama, r.tokens, max_new_tokens=4, stop_at_newline=False, stop_ids=[])
    P, H = len(r), tiny_llama.cfg.n_heads
    assert shapes[0] == (1, H, P, P)
    assert shapes[1:] == [(1, H, 1, P + i + 1) for i in range(3)]


# ---- the runner ---------------------------------------------------------------------------------


class _Boom(RuntimeError):
    pass


def test_resume_after_interruption(tiny_llama, tmp_path):
    examples = make_synthetic_qa(6, n_docs=3, seed=2)
    out = tmp_path / "run.jsonl"
    seen = []

    def crashing(r):
        seen.append(r.id)
        if len(seen) == 3:
            raise _Boom("interrupted")
        return contextlib.nullcontext()

    with pytest.raises(_Boom):
        evaluate(tiny_llama, examples, intervene=crashing, output=out, progress=False, max_new_tokens=4,
                 id="nullcontext")
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + 2  # header + the two finished examples
    assert count_hooks(tiny_llama) == 0

    resumed = []

    def counting(r):
        resumed.append(r.id)
        return contextlib.nullcontext()

    # A bare callable has no content identity: the same explicit id as the crashed run resumes it.
    res = evaluate(tiny_llama, examples, intervene=counting, output=out, progress=False, max_new_tokens=4,
                   id="nullcontext")
    assert resumed == [e.id for e in examples[2:]]  # only the unfinished ones ran
    assert res.n_resumed == 2 and len(res) == 6
    assert [r["index"] for r in res.records] == list(range(6))
    # Same answers as an uninterrupted run.
    fresh = evaluate(tiny_llama, examples, progress=False, max_new_tokens=4, batch_size=1)
    assert res.predictions == fresh.predictions
    # A third call recomputes nothing.
    again = []
    counting2 = lambda r: again.append(r) or contextlib.nullcontext()  # noqa: E731
    evaluate(tiny_llama, examples, intervene=counting2, output=out, progress=False, max_new_tokens=4,
             id="nullcontext")
    assert again == []


def test_records_file_format_and_torn_line(tiny_llama, tmp_path):
    examples = make_synthetic_qa(4, n_docs=2, seed=3)
    out = tmp_path / "r.jsonl"
    res = evaluate(tiny_llama, examples, output=out, progress=False, max_new_tokens=3, batch_size=2)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["focuslens_eval"] == RECORD_FORMAT_VERSION and lines[0]["config_hash"] == res.config_hash
    assert [x["key"] for x in lines[1:]] == [f"{i}:{e.id}" for i, e in enumerate(examples)]
    for x in lines[1:]:
        assert {"prediction", "em", "distractor_copy", "gold_position", "seconds", "prompt_hash"} <= set(x)
    # Simulate a crash in the middle of writing the last record.
    text = out.read_text()
    cut = text.rstrip("\n").rfind("\n") + 1
    out.write_text(text[: cut + 25])
    res2 = evaluate(tiny_llama, examples, output=out, progress=False, max_new_tokens=3)
    assert res2.n_resumed == 3 and res2.predictions == res.predictions
    assert len(out.read_text().splitlines()) == 5
    assert all(json.loads(x) for x in out.read_text().splitlines())


def test_config_mismatch_is_a_clear_error(tiny_llama, tmp_path):
    examples = make_synthetic_qa(2, n_docs=2, seed=4)
    out = tmp_path / "c.jsonl"
    evaluate(tiny_llama, examples, output=out, progress=False, max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens=3 there, 5 now"):
        evaluate(tiny_llama, examples, output=out, progress=False, max_new_tokens=5)
    with pytest.raises(ValueError, match="variant"):
        evaluate(tiny_llama, examples, output=out, progress=False, max_new_tokens=3, variant="gold_only")
    with pytest.raises(ValueError, match="different prompt"):
        evaluate(tiny_llama, make_synthetic_qa(2, n_docs=3, seed=4), output=out, progress=False, max_new_tokens=3)
    # resume=False overwrites.
    res = evaluate(tiny_llama, examples, output=out, progress=False, max_new_tokens=5, resume=False)
    assert res.n_resumed == 0 and len(out.read_text().splitlines()) == 3


def test_context_manager_intervene_entered_once(tiny_llama):
    examples = make_synthetic_qa(3, n_docs=2, seed=5)
    calls = []
    fn = lambda x, hook: calls.append(1)  # noqa: E731
    handle = attach_hooks(tiny_llama, [("blocks.0.attn.hook_pattern", fn)], label="probe")
    res = evaluate(tiny_llama, examples, intervene=handle, progress=False, max_new_tokens=2,
                   stop_at_newline=False, batch_size=1)
    # Active during the run (prefill + one step per example, unless EOS came first), removed after.
    assert 3 <= len(calls) <= 6 and count_hooks(tiny_llama) == 0
    assert res.config["intervene"] == "probe"
    with pytest.raises(TypeError, match="intervene"):
        evaluate(tiny_llama, examples, intervene=42, progress=False)


def test_per_example_intervention_changes_answers_and_sees_its_own_span(tiny_llama):
    examples = make_synthetic_qa(3, n_docs=3, seed=6)
    spans = []

    def zero_gold(r):
        spans.append(r.relevant)

        def fn(pattern, hook):  # [batch, head, q, k]: remove all attention to the gold document
            pattern = pattern.clone()
            pattern[..., r.relevant.start : r.relevant.end] = 0
            return pattern / pattern.sum(-1, keepdim=True)

        return attach_hooks(tiny_llama, [(f"blocks.{l}.attn.hook_pattern", fn) for l in range(2)])

    base = evaluate(tiny_llama, examples, progress=False, max_new_tokens=6, stop_at_newline=False)
    edited = evaluate(tiny_llama, examples, intervene=zero_gold, progress=False, max_new_tokens=6,
                      stop_at_newline=False)
    assert spans == [render(e, tiny_llama).relevant for e in examples]
    assert base.predictions != edited.predictions
    assert base.config_hash != edited.config_hash


def test_summary_and_table(tiny_llama):
    res = evaluate(tiny_llama, make_synthetic_qa(4, n_docs=3, seed=7, gold_position=[0, 2]),
                   progress=False, max_new_tokens=2)
    # Override predictions to check the summary arithmetic.
    for rec, em, copy in zip(res.records, [1, 0, 1, 1], [0, 1, 0, 0]):
        rec["em"], rec["distractor_copy"] = float(em), float(copy)
    s = res.summary()
    assert s["n"] == 4 and s["accuracy"] == 0.75 and s["distractor_copy"] == 0.25
    assert s["by_position"] == {0: {"accuracy": 1.0, "se": 0.0, "n": 2},
                                2: {"accuracy": 0.5, "se": 0.5, "n": 2}}
    t = res.table()
    assert "| 4 | original | 0.750 ± 0.250 |" in t and "| 3 | 2 | 0.500 ± 0.500 |" in t
    assert isinstance(res, EvalResult) and "accuracy=0.750" in repr(res)


def test_evaluate_scores_real_answers_on_smollm(smollm):
    # One 1-document example: SmolLM2 reads the answer off the document.
    ex = make_synthetic_qa(2, n_docs=1, seed=0)
    res = evaluate(smollm, ex, progress=False)
    for rec in res.records:
        assert rec["n_new_tokens"] <= 24 and "\n" not in rec["prediction"].strip()
    assert res.summary()["accuracy"] == 1.0, res.predictions


# ---- teacher-forced margins ---------------------------------------------------------------------


def _naive_logprob(model, prompt, cont):
    seq = torch.cat([prompt, torch.tensor(cont)])[None]
    with torch.no_grad():
        lsm = torch.log_softmax(model(seq)[0].double(), -1)
    P = len(prompt)
    return sum(float(lsm[P - 1 + t, c]) for t, c in enumerate(cont))


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("chat", [True, False])
def test_margins_match_full_forward(request, arch, chat):
    model = request.getfixturevalue(arch)
    tok = model.tokenizer
    exs = make_synthetic_qa(2, n_docs=4, seed=8) + make_kv_retrieval(1, n_docs=3, key_length=8, seed=8)
    rs = [render(e, model, chat=chat) for e in exs]
    res = teacher_forced_margins(model, rs, batch_size=2)
    assert len(res) == 3
    for j, r in enumerate(rs):
        prefix = r.example.meta.get("answer_prefix") or ("" if chat else " ")
        g = max(_naive_logprob(model, r.tokens, tok(prefix + a, add_special_tokens=False).input_ids) for a in r.answers)
        ds = [_naive_logprob(model, r.tokens, tok(prefix + a, add_special_tokens=False).input_ids)
              for a in r.distractor_answers]
        assert res.gold_logprob[j] == pytest.approx(g, abs=1e-3)
        assert res.distractor_logprob[j] == pytest.approx(max(ds), abs=1e-3)
        assert res.margin[j] == pytest.approx(g - max(ds), abs=2e-3)
        assert res.best_distractor[j] == r.distractor_answers[max(range(len(ds)), key=ds.__getitem__)]


def test_margins_without_distractors_are_nan(tiny_llama):
    rs = [render(make_synthetic_qa(1, n_docs=1)[0], tiny_llama)]
    res = teacher_forced_margins(tiny_llama, rs)
    assert torch.isnan(res.margin).all() and torch.isinf(res.distractor_logprob).all()


def test_prerendered_examples_must_match_the_settings(tiny_llama):
    exs = make_synthetic_qa(2, n_docs=3, seed=9)
    rs = [render(e, tiny_llama, variant="gold_only", index=i) for i, e in enumerate(exs)]
    a = evaluate(tiny_llama, rs, variant="gold_only", progress=False, max_new_tokens=3)
    b = evaluate(tiny_llama, exs, variant="gold_only", progress=False, max_new_tokens=3)
    assert a.predictions == b.predictions and all(r["n_docs"] == 1 for r in a.records)
    with pytest.raises(ValueError, match="variant='gold_only'"):
        evaluate(tiny_llama, rs, progress=False, max_new_tokens=3)


# ---- interventions as specs: records keyed by content -----------------------------------------


def test_other_tau_into_the_same_file_never_returns_the_first_answers(tiny_llama, tmp_path):
    """The reproduction: τ = 0.01, then τ = 5 into one output file."""
    from focuslens.intervene.eager import split_softmax
    from focuslens.intervene.span_specs import SplitSoftmax

    examples = make_synthetic_qa(3, n_docs=3, seed=11)
    heads = [(0, 0), (0, 1), (1, 2), (1, 3)]
    out = tmp_path / "ss.jsonl"
    # The old way (a lambda with output=) is refused: nothing identifies what it does.
    with pytest.raises(ValueError, match="pass a spec.*or an explicit id"):
        evaluate(tiny_llama, examples, intervene=lambda r: split_softmax(tiny_llama, heads, r.relevant, 0.01),
                 output=out, progress=False, max_new_tokens=4)
    assert not out.exists() and count_hooks(tiny_llama) == 0
    low = evaluate(tiny_llama, examples, intervene=SplitSoftmax(heads, 0.01), output=out, progress=False,
                   max_new_tokens=4, stop_at_newline=False)
    with pytest.raises(ValueError, match=r"intervene\.tau=0\.01 there, 5\.0 now"):
        evaluate(tiny_llama, examples, intervene=SplitSoftmax(heads, 5.0), output=out, progress=False,
                 max_new_tokens=4, stop_at_newline=False)
    high = evaluate(tiny_llama, examples, intervene=SplitSoftmax(heads, 5.0), output=tmp_path / "ss5.jsonl",
                    progress=False, max_new_tokens=4, stop_at_newline=False)
    assert high.n_resumed == 0 and low.config_hash != high.config_hash
    assert high.config["intervene"]["tau"] == 5.0 and low.config["intervene"]["tau"] == 0.01
    # The spec gives exactly what the eager per-example callable gives.
    ref = evaluate(tiny_llama, examples, intervene=lambda r: split_softmax(tiny_llama, heads, r.relevant, 0.01),
                   progress=False, max_new_tokens=4, stop_at_newline=False)
    assert low.predictions == ref.predictions
    # Same spec again: everything resumed.
    again = evaluate(tiny_llama, examples, intervene=SplitSoftmax(heads, 0.01), output=out, progress=False,
                     max_new_tokens=4, stop_at_newline=False)
    assert again.n_resumed == 3 and again.predictions == low.predictions
    # Heads in another order is another configuration (and says so).
    with pytest.raises(ValueError, match=r"intervene\.heads"):
        evaluate(tiny_llama, examples, intervene=SplitSoftmax(heads[::-1], 0.01), output=out, progress=False,
                 max_new_tokens=4, stop_at_newline=False)


def test_bare_callable_or_context_manager_with_output_needs_an_id(tiny_llama, tmp_path):
    from focuslens.intervene.span_specs import SplitSoftmax

    examples = make_synthetic_qa(2, n_docs=2, seed=12)
    handle = attach_hooks(tiny_llama, [("blocks.0.attn.hook_pattern", lambda x, hook: x)], label="probe")
    with pytest.raises(ValueError, match="id="):
        evaluate(tiny_llama, examples, intervene=handle, output=tmp_path / "h.jsonl", progress=False)
    handle.remove()
    with pytest.raises(ValueError, match="id="):
        evaluate(tiny_llama, examples, intervene=lambda r: contextlib.nullcontext(), output=tmp_path / "l.jsonl",
                 progress=False)
    # An id is not for specs (they carry their own identity).
    with pytest.raises(ValueError, match="own content identity"):
        evaluate(tiny_llama, examples, intervene=SplitSoftmax([(0, 0)], 0.5), id="x", progress=False)
    res = evaluate(tiny_llama, examples, intervene=lambda r: contextlib.nullcontext(), id="noop",
                   output=tmp_path / "l.jsonl", progress=False, max_new_tokens=2)
    assert res.config["intervene"] == {"kind": "custom", "id": "noop"}
    assert count_hooks(tiny_llama) == 0


def test_spec_hooks_removed_after_an_exception(tiny_llama, tmp_path):
    from focuslens.core.prompts import Span
    from focuslens.intervene.specs import Compose, InterventionSpec
    from focuslens.intervene.vector_specs import InjectVectors
    from focuslens.intervene.span_specs import SplitSoftmax

    examples = make_synthetic_qa(2, n_docs=2, seed=13)
    vec = InjectVectors({(0, 1): torch.ones(tiny_llama.cfg.d_head)}, alpha=0.5)
    bad = Compose(vec, SplitSoftmax([(1, 0)], 0.5, span=Span(0, 10_000)))  # its 2nd member fails to attach
    with pytest.raises(ValueError, match="outside the sequence"):
        evaluate(tiny_llama, examples, intervene=bad, output=tmp_path / "b.jsonl", progress=False, max_new_tokens=2)
    assert count_hooks(tiny_llama) == 0

    class Exploding(InterventionSpec):  # attaches fine, then fails inside generation
        kind = "exploding"

        def __init__(self):
            self._freeze()

        def _identity(self):
            return {}

        @property
        def per_example(self):
            return True

        def attach(self, model, example=None):
            def boom(x, hook):
                raise _Boom("inside the forward pass")

            return attach_hooks(model, [("blocks.1.attn.hook_pattern", boom)])

    for spec in (Exploding(), vec + Exploding()):
        with pytest.raises(_Boom):
            evaluate(tiny_llama, examples, intervene=spec, output=tmp_path / "e.jsonl", progress=False,
                     max_new_tokens=2, resume=False)
        assert count_hooks(tiny_llama) == 0
    # A negative prompt has no relevant span: a clear error, nothing left attached.
    with pytest.raises(ValueError, match="no such span"):
        evaluate(tiny_llama, examples, intervene=SplitSoftmax([(1, 0)], 0.5), variant="negative",
                 progress=False, max_new_tokens=2)
    assert count_hooks(tiny_llama) == 0


def test_example_independent_spec_is_attached_once_and_batches(tiny_llama):
    from focuslens.intervene.eager import inject_vectors
    from focuslens.intervene.vector_specs import InjectVectors
    from focuslens.intervene.specs import NoIntervention

    examples = make_synthetic_qa(4, n_docs=2, seed=14)
    g = torch.Generator().manual_seed(0)
    vecs = {(0, 1): torch.randn(tiny_llama.cfg.d_head, generator=g) * 4, (1, 3): torch.randn(tiny_llama.cfg.d_head, generator=g) * 4}
    spec = InjectVectors(vecs, alpha=1.0)
    assert not spec.per_example
    res = evaluate(tiny_llama, examples, intervene=spec, progress=False, max_new_tokens=4, batch_size=4)
    assert {r["batch_size"] for r in res.records} == {4}
    with inject_vectors(tiny_llama, vecs, alpha=1.0):
        ref = evaluate(tiny_llama, examples, progress=False, max_new_tokens=4, batch_size=4)
    assert res.predictions == ref.predictions and count_hooks(tiny_llama) == 0
    # NoIntervention is the unmodified model, with the same records key as None.
    none = evaluate(tiny_llama, examples, intervene=NoIntervention(), progress=False, max_new_tokens=4)
    plain = evaluate(tiny_llama, examples, progress=False, max_new_tokens=4)
    assert none.config_hash == plain.config_hash and none.predictions == plain.predictions


def test_decoding_bundle_and_old_keywords_agree(tiny_llama):
    from focuslens.evaluation.runner import Decoding

    examples = make_synthetic_qa(2, n_docs=2, seed=15)
    a = evaluate(tiny_llama, examples, decoding=Decoding(max_new_tokens=3, stop_at_newline=False), progress=False)
    b = evaluate(tiny_llama, examples, max_new_tokens=3, stop_at_newline=False, progress=False)
    assert a.config_hash == b.config_hash and a.predictions == b.predictions
    c = evaluate(tiny_llama, examples, decoding=Decoding(max_new_tokens=3), max_new_tokens=2, progress=False)
    assert c.config["max_new_tokens"] == 2
    with pytest.raises(TypeError, match="max_tokens"):
        evaluate(tiny_llama, examples, max_tokens=3, progress=False)


def test_margins_accept_specs(tiny_llama):
    from focuslens.intervene.eager import split_softmax
    from focuslens.intervene.span_specs import SplitSoftmax

    rs = [render(e, tiny_llama) for e in make_synthetic_qa(2, n_docs=3, seed=16)]
    heads = [(0, 0), (1, 1)]
    a = teacher_forced_margins(tiny_llama, rs, intervene=SplitSoftmax(heads, 0.2))
    b = teacher_forced_margins(tiny_llama, rs, intervene=lambda r: split_softmax(tiny_llama, heads, r.relevant, 0.2))
    assert torch.equal(a.margin, b.margin) and count_hooks(tiny_llama) == 0


def test_other_weights_of_the_same_architecture_are_never_resumed(tiny_llama, tmp_path):
    """Same fingerprint (architecture), other weights: the records file is refused, not reused."""
    from focuslens.core.models import model_info, weights_digest
    from focuslens.testing import tiny_model

    other = tiny_model("llama", seed=1)
    assert model_info(other).fingerprint() == model_info(tiny_llama).fingerprint()
    assert weights_digest(other) != weights_digest(tiny_llama)
    exs = make_synthetic_qa(2, n_docs=2, seed=4)
    out = tmp_path / "r.jsonl"
    evaluate(tiny_llama, exs, max_new_tokens=2, output=out, progress=False)
    with pytest.raises(ValueError, match="model_weights"):
        evaluate(other, exs, max_new_tokens=2, output=out, progress=False)
    again = evaluate(tiny_llama, exs, max_new_tokens=2, output=out, progress=False)
    assert again.n_resumed == 2
