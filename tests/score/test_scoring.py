"""Contextual scoring: exact against Hugging Face eager attention, on every tiny arch and SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch

import focuslens as fl
from focuslens.core.hooks import count_hooks
from focuslens.core.prompts import Span, build_prompt
from focuslens.score.contextual import DatasetScores, HeadScores, contextual_scores, qk_route_available, score_dataset, score_many, score_spans
from focuslens.score.ranking import contextual_heads, load_heads, save_heads
from focuslens.testing import tiny_hf_model

ATOL = 1e-5


@pytest.fixture(scope="module")
def hf_refs():
    """Independent references: the same tiny HF models in eager mode (fresh instances, same seed)."""
    out = {}
    for arch in ("llama", "llama_mha", "gpt2", "qwen2"):
        m = tiny_hf_model(arch)
        m.set_attn_implementation("eager")
        out[arch] = m
    return out


def _hf_attn(hf, tokens) -> torch.Tensor:
    """[layer, head, q, k] attention from HF eager with output_attentions=True."""
    with torch.no_grad():
        out = hf(torch.as_tensor(tokens)[None], output_attentions=True)
    return torch.stack(out.attentions)[:, 0].float()


def _ref_mass(att, response, cols) -> torch.Tensor:
    mask = torch.zeros(att.shape[-1], dtype=torch.bool)
    for a, b in cols:
        mask[a:b] = True
    return att[:, :, response[0]:response[1]][..., mask].sum(-1).mean(-1)


def _tokens(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n,), generator=g)


@pytest.fixture(params=["llama", "llama_mha", "gpt2", "qwen2"])
def arch_model(request, tiny_llama, tiny_llama_mha, tiny_gpt2, tiny_qwen2):
    m = {"llama": tiny_llama, "llama_mha": tiny_llama_mha, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2}[request.param]
    yield request.param, m
    assert count_hooks(m) == 0


@pytest.mark.parametrize("method", ["auto", "qk", "pattern"])
def test_exact_against_hf_eager(arch_model, hf_refs, method):
    arch, model = arch_model
    toks = _tokens()
    att = _hf_attn(hf_refs[arch], toks)
    R, C = (36, 48), [(3, 10), (20, 27)]
    s = contextual_scores(model, toks, relevant=C, response=R, method=method)
    info = fl.model_info(model)
    assert s.shape == (info.n_layers, info.n_heads) and s.dtype == torch.float32
    torch.testing.assert_close(s, _ref_mass(att, R, C), atol=ATOL, rtol=0)
    assert s.min() > 0  # random tiny models attend everywhere a little: a real, non-trivial check


def test_qk_route_is_used_on_plain_architectures(arch_model):
    _, model = arch_model
    ok, why = qk_route_available(model)
    assert ok, why
    hs = score_spans(model, _tokens(), response=(40, 48), spans={"relevant": (5, 9)}, method="qk")
    assert hs.method == "qk"
    assert score_spans(model, _tokens(), response=(40, 48), spans={"relevant": (5, 9)}).method == "pattern"


def test_score_spans_named_masses(tiny_llama, hf_refs):
    toks = _tokens(60, seed=1)
    att = _hf_attn(hf_refs["llama"], toks)
    R = (50, 60)
    d = [(5, 12), (12, 20), (30, 41)]
    hs = score_spans(tiny_llama, toks, response=R, spans={"relevant": (20, 30), "two": [(1, 3), (41, 45)]},
                     distractors=d)
    assert isinstance(hs, HeadScores)
    torch.testing.assert_close(hs.relevant, _ref_mass(att, R, [(20, 30)]), atol=ATOL, rtol=0)
    torch.testing.assert_close(hs.sink, _ref_mass(att, R, [(0, 1)]), atol=ATOL, rtol=0)
    torch.testing.assert_close(hs["two"], _ref_mass(att, R, [(1, 3), (41, 45)]), atol=ATOL, rtol=0)
    per = [_ref_mass(att, R, [x]) for x in d]
    for i, ref in enumerate(per, start=1):
        torch.testing.assert_close(hs[f"distractor_{i}"], ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(hs.distractors_total, _ref_mass(att, R, d), atol=ATOL, rtol=0)
    torch.testing.assert_close(hs.distractors_max, torch.stack(per).amax(0), atol=ATOL, rtol=0)
    # all masses come from one columns tensor; rows of a softmax sum to 1
    torch.testing.assert_close(hs.columns.sum(-1), torch.ones(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(hs.mass((20, 30)), hs.relevant)
    with pytest.raises(AttributeError, match="no score 'nope'"):
        hs.nope


def test_union_of_overlapping_spans_is_not_double_counted(tiny_llama):
    toks = _tokens()
    a = contextual_scores(tiny_llama, toks, relevant=[(3, 10), (5, 12)], response=(40, 48))
    b = contextual_scores(tiny_llama, toks, relevant=Span(3, 12), response=slice(40, 48))
    torch.testing.assert_close(a, b)


def test_batch_dim_and_span_types(tiny_gpt2):
    toks = _tokens()
    a = contextual_scores(tiny_gpt2, toks[None], relevant=slice(2, 9), response=(30, 48))
    b = contextual_scores(tiny_gpt2, toks, relevant=Span(2, 9), response=Span(30, 48))
    torch.testing.assert_close(a, b)


def test_gqa_scores_every_query_head_and_equals_mha_with_repeated_keys(tiny_llama, hf_refs):
    """Heads sharing a KV head still get different scores (their queries differ)."""
    toks = _tokens()
    s = contextual_scores(tiny_llama, toks, relevant=(3, 20), response=(36, 48))
    assert s.shape[1] == 4 and fl.model_info(tiny_llama).n_kv_heads == 2
    assert not torch.allclose(s[:, 0], s[:, 1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(relevant=(3, 10), response=(40, 60)), "outside the sequence"),
        (dict(relevant=(3, 3), response=(40, 48)), "empty"),
        (dict(relevant=(3, 10), response=(40, 40)), "empty"),
        (dict(relevant=(30, 44), response=(40, 48)), "overlaps the response"),
        (dict(relevant=(44, 46), response=(20, 40)), "comes after the response"),
        (dict(relevant=(3, 10), response=(0, 8)), "there is no earlier context"),
        (dict(relevant=[], response=(40, 48)), "empty list"),
    ],
)
def test_bad_spans_raise_clear_errors(tiny_llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        contextual_scores(tiny_llama, _tokens(), **kwargs)
    assert count_hooks(tiny_llama) == 0


def test_bad_inputs(tiny_llama):
    with pytest.raises(ValueError, match="score_many"):
        contextual_scores(tiny_llama, torch.zeros(2, 10, dtype=torch.long), relevant=(1, 3), response=(5, 10))
    with pytest.raises(ValueError, match="method"):
        contextual_scores(tiny_llama, _tokens(), relevant=(1, 3), response=(5, 10), method="fast")
    with pytest.raises(ValueError, match="reserved"):
        score_spans(tiny_llama, _tokens(), response=(40, 48), spans={"sink": (1, 2)})


def test_hooks_removed_after_exception_inside_forward(tiny_llama, monkeypatch):
    import focuslens.score.contextual as sc

    def boom(*a, **k):
        raise RuntimeError("boom in hook")

    monkeypatch.setattr(sc, "_response_rows_qk", boom)
    with pytest.raises(RuntimeError, match="boom in hook"):
        contextual_scores(tiny_llama, _tokens(), relevant=(1, 5), response=(40, 48), method="qk")
    assert count_hooks(tiny_llama) == 0
    # the early stop leaves the model usable: logits unchanged by a scoring pass
    toks = _tokens()[None]
    before = tiny_llama(toks)
    monkeypatch.undo()
    contextual_scores(tiny_llama, toks, relevant=(1, 5), response=(40, 48))
    torch.testing.assert_close(tiny_llama(toks), before, atol=0, rtol=0)


def test_score_many_different_lengths(tiny_qwen2):
    items = [
        (_tokens(30, seed=2), {"response": (25, 30), "relevant": (2, 9), "distractors": [(10, 15), (15, 20)]}),
        (_tokens(48, seed=3), {"response": (40, 48), "relevant": [(2, 9), (11, 12)]}),
    ]
    out = score_many(tiny_qwen2, items)
    assert len(out) == 2
    for (toks, sp), hs in zip(items, out):
        ref = contextual_scores(tiny_qwen2, toks, relevant=sp["relevant"], response=sp["response"])
        torch.testing.assert_close(hs.relevant, ref)
        assert hs.seq_len == len(toks)
    assert "distractors_max" in out[0] and "distractors_max" not in out[1]


def test_score_many_labelled_prompt(tok, tiny_llama):
    p = build_prompt(tok, ["Read.\n", ("doc_1", "The capital of Marn is Pell."), "\n",
                           ("doc_2", "The capital of Veloria is Quentor."), "\nQ: ", ("question", "Marn?")])
    p = p.with_response(tok, " Pell")
    (hs,) = score_many(tiny_llama, [p])
    ref = contextual_scores(tiny_llama, p.tokens, relevant=p["doc_1"], response=p.response)
    torch.testing.assert_close(hs.doc_1, ref)


# ------------------------------------------------------------------ dataset level


def _rendered(tok, n=4):
    from focuslens.tasks.records import Document, TaskExample, render

    names = [("Marn", "Pell"), ("Veloria", "Quentor"), ("Alpha", "Blue"), ("Beta", "Key")]
    out = []
    for i in range(n):
        docs = [Document(title=e, text=f"The capital of {e} is {v}.", isgold=(j == i % 4))
                for j, (e, v) in enumerate(names)]
        ex = TaskExample(question=f"What is the capital of {names[i % 4][0]}?", answers=[names[i % 4][1]],
                         ctxs=docs, gold_index=i % 4,
                         distractor_answers=[v for j, (_, v) in enumerate(names) if j != i % 4])
        out.append(render(ex, tok, variant="original", chat=True))
    return out


def test_score_dataset_gold_matches_per_example(tok, tiny_llama):
    exs = _rendered(tok, 4)
    ds = score_dataset(tiny_llama, exs, response="gold", progress=False)
    assert isinstance(ds, DatasetScores) and ds.n == 4 and ds.n_skipped == 0
    per = []
    for ex in exs:
        full = ex.prompt.with_response(tok, ex.answers[0])
        per.append(contextual_scores(tiny_llama, full.tokens, relevant=ex.relevant, response=full.response))
    per = torch.stack(per)
    torch.testing.assert_close(ds.relevant, per.mean(0))
    torch.testing.assert_close(ds.stderr["relevant"], per.std(0) / 2)
    assert set(ds.mean) == {"relevant", "sink", "distractors_total", "distractors_max"}
    rank = ds.ranking()
    assert len(rank) == 8 and rank[0][2] == pytest.approx(float(ds.relevant.max()))
    assert all(a[2] >= b[2] for a, b in zip(rank, rank[1:]))
    top = ds.top_k(3)
    assert top == [(l, h) for l, h, _ in rank[:3]] == contextual_heads(ds, k=3) == contextual_heads(ds.relevant, 3)
    assert ds.responses == [ex.answers[0] for ex in exs] and ds.indices == [0, 1, 2, 3]


def test_score_dataset_generate_and_callable(tok, tiny_gpt2):
    exs = _rendered(tok, 2)
    ds = score_dataset(tiny_gpt2, exs, response="generate", max_new_tokens=4, progress=False)
    assert ds.n + ds.n_skipped == 2 and ds.response_mode == "generate"
    ds2 = score_dataset(tiny_gpt2, exs, response=lambda ex: " The capital", progress=False)
    assert ds2.n == 2 and ds2.response_mode == "callable"


def test_score_dataset_batched_generation_equals_one_by_one(tok, tiny_llama):
    """Responses generated batch_size at a time give the scores of one at a time; examples without a
    relevant span are skipped inside a chunk without shifting the others."""
    from focuslens.tasks import make_synthetic_qa, render

    exs = [render(e, tok) for e in make_synthetic_qa(5, n_docs=3, seed=2, doc_sentences=1)]
    exs.insert(2, render(make_synthetic_qa(1, n_docs=3, seed=3)[0], tok, variant="negative"))
    assert len({len(r.tokens) for r in exs}) > 1
    for mode in ("generate", "gold_only"):
        one = score_dataset(tiny_llama, exs, response=mode, max_new_tokens=5, progress=False, batch_size=1)
        for bs in (2, 4):
            bat = score_dataset(tiny_llama, exs, response=mode, max_new_tokens=5, progress=False, batch_size=bs)
            assert bat.responses == one.responses and bat.indices == one.indices
            assert bat.n_skipped == one.n_skipped >= 1 and 2 not in bat.indices
            for k in one.mean:
                torch.testing.assert_close(bat.per_example[k], one.per_example[k], atol=0, rtol=0)
    for bad in (0, True, 1.5):  # a count: bools and floats are not taken
        with pytest.raises(ValueError, match=r"score_dataset: batch_size must be an int in >= 1, got"):
            score_dataset(tiny_llama, exs, progress=False, batch_size=bad)


def test_score_dataset_zero_usable_raises(tok, tiny_llama):
    with pytest.raises(ValueError, match="0 of 2 examples were usable"):
        score_dataset(tiny_llama, _rendered(tok, 2), response=lambda ex: "", progress=False)


def test_generate_strips_stop_tokens(tok, tiny_llama):
    from focuslens.core.generation import generate_response

    ex = _rendered(tok, 1)[0]
    r = generate_response(tiny_llama, ex.prompt.tokens, max_new_tokens=5)
    assert r.dim() == 1 and len(r) <= 5 and 0 not in r.tolist()


def test_ranking_json_roundtrip_and_authors_format(tok, tiny_llama, tmp_path):
    ds = score_dataset(tiny_llama, _rendered(tok, 2), response="gold", progress=False)
    path = ds.save(tmp_path / "r" / "ranking.json")
    assert not list(path.parent.glob("*.tmp"))
    back = DatasetScores.load(path)
    torch.testing.assert_close(back.relevant, ds.relevant)
    assert back.top_k(5) == ds.top_k(5) and back.n == 2
    assert load_heads(path, k=3) == ds.top_k(3)
    authors = tmp_path / "relevant_heads.json"
    authors.write_text(json.dumps([[1, 2], [0, 3]]))
    assert load_heads(authors, model=tiny_llama) == [(1, 2), (0, 3)]
    save_heads([(0, 1), (1, 0)], tmp_path / "h.json")
    assert json.loads((tmp_path / "h.json").read_text()) == [[0, 1], [1, 0]]
    (tmp_path / "bad.json").write_text(json.dumps([[1, 9]]))
    with pytest.raises(ValueError, match="Unknown head"):
        load_heads(tmp_path / "bad.json", model=tiny_llama)
    with pytest.raises(ValueError, match="not a focuslens ranking"):
        DatasetScores.load(authors)


def test_contextual_heads_validates_k():
    s = torch.tensor([[0.1, 0.5], [0.3, 0.2]])
    assert contextual_heads(s, k=2) == [(0, 1), (1, 0)]
    for bad in (5, 0, True, 2.0):  # more than the 4 heads, none, a bool, a float
        with pytest.raises(ValueError, match=rf"k must be an int in 1\.\.4, got {bad!r}"):
            contextual_heads(s, k=bad)


# ------------------------------------------------------------------ SmolLM2 (real model, brief)


def test_smollm_exact_against_hf_eager(smollm):
    from transformers import AutoModelForCausalLM

    from focuslens.core.models import default_model_dir

    hf = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    tok = smollm.tokenizer
    p = build_prompt(tok, [("instruction", "Answer the question using the documents."), "\n\n",
                           ("doc_1", "Document [1] The capital of Veloria is Quentor."), "\n",
                           ("doc_2", "Document [2] The capital of Marn is Pell."), "\n\nQuestion: ",
                           ("question", "What is the capital of Marn?")], chat=True)
    p = p.with_response(tok, "The capital of Marn is Pell.")
    att = _hf_attn(hf, p.tokens)
    R = tuple(p.response)
    hs = score_spans(smollm, p.tokens, response=p.response, spans={"relevant": p["doc_2"]},
                     distractors=[p["doc_1"]], method="qk")
    assert hs.method == "qk" and hs.relevant.shape == (30, 9)
    torch.testing.assert_close(hs.relevant, _ref_mass(att, R, [tuple(p["doc_2"])]), atol=ATOL, rtol=0)
    torch.testing.assert_close(hs.sink, _ref_mass(att, R, [(0, 1)]), atol=ATOL, rtol=0)
    torch.testing.assert_close(hs.distractors_total, _ref_mass(att, R, [tuple(p["doc_1"])]), atol=ATOL, rtol=0)
    pat = contextual_scores(smollm, p.tokens, relevant=p["doc_2"], response=p.response)  # auto = pattern
    torch.testing.assert_close(pat, _ref_mass(att, R, [tuple(p["doc_2"])]), atol=ATOL, rtol=0)


def test_qk_route_applies_softcap_and_equals_pattern(tiny_llama_mha, hf_refs):
    """A logit softcap (Gemma-2 style) is part of the one attention definition: the q/k route applies
    it and equals the pattern route, which sees the capped attention the model really computes."""
    hf_attn = tiny_llama_mha.blocks[0].attn.original_component
    toks = _tokens()
    try:
        hf_attn.attn_logit_softcapping = 0.5
        ok, why = qk_route_available(tiny_llama_mha)
        assert ok, why
        qk = contextual_scores(tiny_llama_mha, toks, relevant=(1, 5), response=(40, 48), method="qk")
        capped = contextual_scores(tiny_llama_mha, toks, relevant=(1, 5), response=(40, 48))
        torch.testing.assert_close(qk, capped, atol=ATOL, rtol=0)
        plain = _ref_mass(_hf_attn(hf_refs["llama_mha"], toks), (40, 48), [(1, 5)])
        assert (capped[0] - plain[0]).abs().max() > 1e-3  # the softcap did change layer 0
    finally:
        del hf_attn.attn_logit_softcapping
    assert qk_route_available(tiny_llama_mha)[0]


def test_qk_route_refused_when_attention_has_extra_terms(tiny_llama_mha, hf_refs):
    """Learned attention sinks (GPT-OSS style) make q/k alone inexact: qk refuses, pattern stays exact."""
    hf_attn = tiny_llama_mha.blocks[0].attn.original_component
    toks = _tokens()
    try:
        hf_attn.sinks = torch.nn.Parameter(torch.full((4,), 2.0), requires_grad=False)
        ok, why = qk_route_available(tiny_llama_mha)
        assert not ok and "sinks" in why
        with pytest.raises(ValueError, match="not exact on this model"):
            contextual_scores(tiny_llama_mha, toks, relevant=(1, 5), response=(40, 48), method="qk")
        sunk = contextual_scores(tiny_llama_mha, toks, relevant=(1, 5), response=(40, 48))
        plain = _ref_mass(_hf_attn(hf_refs["llama_mha"], toks), (40, 48), [(1, 5)])
        assert (sunk[0] - plain[0]).abs().max() > 1e-3  # the sinks did change layer 0
    finally:
        del hf_attn.sinks
    assert qk_route_available(tiny_llama_mha)[0]


def test_qk_route_exact_on_sliding_window_and_qk_norm(tiny_gemma3):
    """Gemma-3 (layer 0 slides over 8 keys, QK-norm, own scale): q/k route = pattern route, 40 tokens."""
    ok, why = qk_route_available(tiny_gemma3)
    assert ok, why
    toks = _tokens(40, seed=4)
    kw = dict(response=(30, 40), spans={"relevant": (3, 12), "near": (24, 30)}, distractors=[(12, 20)])
    qk = score_spans(tiny_gemma3, toks, method="qk", **kw)
    pat = score_spans(tiny_gemma3, toks, method="pattern", **kw)
    assert qk.method == "qk" and pat.method == "pattern"
    torch.testing.assert_close(qk.columns, pat.columns, atol=ATOL, rtol=0)
    for name in pat.names:
        torch.testing.assert_close(qk[name], pat[name], atol=ATOL, rtol=0)
    # the window is real: layer 0's response rows cannot see the relevant span (t - j >= 8) or the sink
    assert float(pat.relevant[0].abs().max()) == 0.0 and float(pat.sink[0].abs().max()) == 0.0
    assert float(pat.relevant[1].min()) > 0


def test_nan_scores_rank_last_consistently():
    """A NaN score never outranks a real one (it used to scramble the order), everywhere a ranking is made."""
    from focuslens.score.ranking import _rank

    s = torch.tensor([[0.1, float("nan"), 0.9, 0.5]])
    assert contextual_heads(s, k=4) == [(0, 2), (0, 3), (0, 0), (0, 1)]
    assert [(l, h) for l, h, _ in _rank(s)] == [(0, 2), (0, 3), (0, 0), (0, 1)]
    assert contextual_heads(torch.tensor([[float("nan"), float("nan")], [0.2, 0.3]]), k=2) == [(1, 1), (1, 0)]


def test_ranking_of_another_model_is_refused(tiny_llama, tmp_path):
    from focuslens.tasks import make_synthetic_qa, render

    exs = [render(e, tiny_llama.tokenizer) for e in make_synthetic_qa(2, n_docs=2, seed=1)]
    ds = score_dataset(tiny_llama, exs, response="gold", progress=False)
    p = ds.save(tmp_path / "r.json")
    assert load_heads(p, k=3, model=tiny_llama) == ds.top_k(3)
    with pytest.raises(ValueError, match="another model.*focuslens score"):
        load_heads(p, k=3, model=_other_arch())
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_heads(tmp_path / "bad.json")
    (tmp_path / "float.json").write_text("[[0.0, 1.5]]")
    with pytest.raises(ValueError, match="pair of ints"):
        load_heads(tmp_path / "float.json")


def _other_arch():
    """The tiny Llama with a 3-layer config: another architecture fingerprint."""
    from focuslens.testing import tiny_model

    return tiny_model("llama", n_layers=3)


def test_heads_must_be_integers(tiny_llama):
    from focuslens.core.checks import check_heads

    assert check_heads(tiny_llama, [(1, 2), (torch.tensor(0), 3)]) == [(1, 2), (0, 3)]
    for bad in ([(0.0, 1.5)], [(8.7, 0)], [(True, 0)], [(0,)], [5]):
        with pytest.raises(ValueError, match="pairs of ints"):
            check_heads(tiny_llama, bad)
