"""Task records, rendering with exact spans, prompt variants, and the synthetic generators."""

from __future__ import annotations

import json

import pytest

from focuslens.tasks import (
    DISTRACTOR_KINDS,
    LITM_INSTRUCTION,
    RELATIONS,
    Document,
    RenderedExample,
    TaskExample,
    format_prompt_text,
    make_kv_retrieval,
    make_needle,
    make_synthetic_qa,
    render,
    render_many,
)


def assert_spans_exact(tok, r: RenderedExample):
    """Every named span decodes to its segment's text, plus at most a little adjacent glue."""
    p = r.prompt
    for name in p.order:
        a, b = p.char_spans[name]
        seg = p.text[a:b].strip()
        dec = tok.decode(p.tokens[p.spans[name].slice].tolist())
        assert seg in dec, (name, seg, dec)
        extra = dec.replace(seg, "", 1).strip()
        # Only punctuation glue merged into a boundary token may come along ('{"' in JSON).
        assert len(extra) <= 2 and not any(c.isalnum() for c in extra), (name, seg, dec)
    # Spans are disjoint and in prompt order.
    spans = [p.spans[n] for n in p.order]
    assert all(x.end <= y.start for x, y in zip(spans, spans[1:]))
    # The relevant span is the gold document's.
    if r.relevant is not None:
        gold = r.example.ctxs[r.example.gold_index]
        assert gold.text in tok.decode(r.tokens[r.relevant.slice].tolist())
        assert r.relevant not in r.distractors
    assert len(r.distractors) == r.n_docs - (r.relevant is not None)
    q = tok.decode(r.tokens[r.question_span.slice].tolist())
    assert r.example.question in q


# ---- records ---------------------------------------------------------------------------------


def _example(n=4, gold=1):
    docs = [Document(f"T{i}", f"The capital of Land{i} is City{i}.", answers=[f"City{i}"]) for i in range(n)]
    return TaskExample(
        question=f"What is the capital of Land{gold}?", answers=[f"City{gold}"], ctxs=docs,
        gold_index=gold, distractor_answers=[f"City{i}" for i in range(n) if i != gold], id="ex0",
    )


def test_contract_positional_fields():
    # The contract's field order (other modules construct these positionally).
    ex = TaskExample("q?", ["a"], [Document("t", "a text", True, True)], 0)
    assert ex.gold_index == 0 and ex.task == "synthetic_qa" and ex.distractor_answers == []
    assert LITM_INSTRUCTION.startswith("Write a high-quality answer")


def test_gold_index_inferred_and_validated():
    docs = [Document("a", "x"), Document("b", "y", isgold=True)]
    assert TaskExample("q?", ["y"], docs).gold_index == 1
    with pytest.raises(ValueError, match="outside"):
        TaskExample("q?", ["y"], [Document("a", "x")], gold_index=3)
    with pytest.raises(ValueError, match="isgold"):
        TaskExample("q?", ["y"], [Document("a", "x", isgold=True), Document("b", "y", isgold=True)])
    with pytest.raises(ValueError, match="disagrees"):
        TaskExample("q?", ["y"], [Document("a", "x", isgold=True), Document("b", "y")], gold_index=1)
    with pytest.raises(ValueError, match="answers"):
        TaskExample("q?", [], [Document("a", "x")])


def test_variants_and_gold_position():
    ex = _example(5, gold=1)
    g = ex.variant("gold_only")
    assert g.n_docs == 1 and g.gold_index == 0 and g.ctxs[0].text == ex.gold.text
    assert ex.variant("gold").ctxs == g.ctxs  # alias
    neg = ex.variant("negative")
    assert neg.n_docs == 4 and neg.gold_index is None and ex.gold not in neg.ctxs
    moved = ex.with_gold_at(-1)
    assert moved.gold_index == 4 and moved.ctxs[4] is ex.gold
    assert [d.title for d in moved.ctxs if not d.isgold] == [d.title for d in ex.distractors]
    assert ex.gold_index == 1  # the original is untouched
    with pytest.raises(ValueError, match="variant"):
        ex.variant("nope")
    with pytest.raises(ValueError, match="outside"):
        ex.with_gold_at(5)


def test_dict_round_trip():
    ex = make_synthetic_qa(3, n_docs=4, seed=1, doc_sentences=1)[2]
    d = ex.to_dict()
    assert json.loads(json.dumps(d)) == d
    back = TaskExample.from_dict(d)
    assert back == ex
    assert d["ctxs"][ex.gold_index]["isgold"] is True


def test_litm_prompt_text_is_verbatim():
    ex = _example(2, gold=0)
    assert format_prompt_text(ex) == (
        "Write a high-quality answer for the given question using only the provided search results "
        "(some of which might be irrelevant).\n\n"
        "Document [1](Title: T0) The capital of Land0 is City0.\n"
        "Document [2](Title: T1) The capital of Land1 is City1.\n\n"
        "Question: What is the capital of Land0?\nAnswer:"
    )


# ---- rendering --------------------------------------------------------------------------------


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("variant", ["original", "gold_only", "negative"])
def test_render_spans_exact_tiny(tok, chat, variant):
    for ex in make_synthetic_qa(3, n_docs=6, seed=2, doc_sentences=2, relation="mixed"):
        r = render(ex, tok, variant=variant, chat=chat)
        assert_spans_exact(tok, r)
        assert r.variant == variant
        assert (r.relevant is None) == (variant == "negative")
        assert r.tokens.tolist() == tok(r.prompt.text, add_special_tokens=not chat).input_ids


@pytest.mark.parametrize("gen", ["qa", "qa_mix", "kv", "needle"])
def test_render_spans_exact_smollm(smollm, gen):
    tok = smollm.tokenizer
    examples = {
        "qa": lambda: make_synthetic_qa(4, n_docs=8, seed=3, doc_sentences=1),
        "qa_mix": lambda: make_synthetic_qa(
            4, n_docs=8, seed=3, distractors={"same_relation": 1, "same_entity": 1, "unrelated": 1}
        ),
        "kv": lambda: make_kv_retrieval(4, n_docs=8, seed=3),
        "needle": lambda: make_needle(4, n_docs=8, n_needles=3, seed=3),
    }[gen]()
    for r in render_many(examples, smollm, chat=True):
        assert_spans_exact(tok, r)
        assert r.tokens.tolist() == tok(r.prompt.text, add_special_tokens=False).input_ids


def test_render_gold_position_control(tok):
    ex = make_synthetic_qa(1, n_docs=7, seed=4)[0]
    for pos in range(7):
        r = render(ex, tok, gold_position=pos, chat=False)
        assert r.gold_position == pos
        assert r.relevant == r.doc_spans[pos]
        assert tok.decode(r.tokens[r.relevant.slice].tolist()).startswith(f"Document [{pos + 1}]")
        assert ex.gold.text in tok.decode(r.tokens[r.relevant.slice].tolist())
    with pytest.raises(ValueError, match="original"):
        render(ex, tok, variant="negative", gold_position=0)


def test_render_accepts_model_and_checks_length(tiny_llama):
    ex = make_synthetic_qa(1, n_docs=3, seed=0)[0]
    r = render(ex, tiny_llama)
    assert r.prompt.chat and len(r) > 0
    with pytest.raises(ValueError, match="context"):
        render(make_synthetic_qa(1, n_docs=40, seed=0)[0], tiny_llama, max_length=100)


# ---- synthetic generators -------------------------------------------------------------------


def test_synthetic_qa_deterministic_1000():
    a = [e.to_dict() for e in make_synthetic_qa(1000, n_docs=5, seed=7, relation="mixed")]
    b = [e.to_dict() for e in make_synthetic_qa(1000, n_docs=5, seed=7, relation="mixed")]
    assert a == b
    c = [e.to_dict() for e in make_synthetic_qa(1000, n_docs=5, seed=8, relation="mixed")]
    assert sum(x["question"] != y["question"] for x, y in zip(a, c)) > 900
    assert len({x["question"] for x in a}) > 990  # made-up names rarely collide


def test_kv_and_needle_deterministic_1000():
    for gen in (make_kv_retrieval, make_needle):
        a = [e.to_dict() for e in gen(1000, n_docs=6, seed=1)]
        assert a == [e.to_dict() for e in gen(1000, n_docs=6, seed=1)]
        assert a != [e.to_dict() for e in gen(1000, n_docs=6, seed=2)]


def test_synthetic_qa_paired_across_n_docs():
    few = make_synthetic_qa(20, n_docs=5, seed=0)
    many = make_synthetic_qa(20, n_docs=20, seed=0)
    one = make_synthetic_qa(20, n_docs=1, seed=0)
    for a, b, c in zip(few, many, one):
        assert a.question == b.question == c.question and a.answers == b.answers == c.answers
        assert set(a.distractor_answers) <= set(b.distractor_answers)
        assert c.n_docs == 1 and c.distractor_answers == []


def test_synthetic_qa_structure():
    for ex in make_synthetic_qa(50, n_docs=10, seed=5):
        assert ex.n_docs == 10 and ex.gold.isgold and ex.gold.kind == "gold"
        value = ex.answers[0]
        assert f"is {value}." in ex.gold.text
        ent = ex.meta["entity"]
        assert ex.question == f"What is the capital of {ent}?"
        # Same-relation distractors: other entities, other values, all of them capitals.
        for d in ex.distractors:
            assert d.kind == "same_relation" and d.title != ent and value not in d.text
            assert d.text.startswith("The capital of ")
        assert len(set(ex.distractor_answers)) == 9 and value not in ex.distractor_answers


def test_synthetic_qa_distractor_mix_and_kinds():
    ex = make_synthetic_qa(1, n_docs=10, seed=0,
                           distractors={"same_relation": 0.5, "same_entity": 0.25, "unrelated": 0.25})[0]
    kinds = [d.kind for d in ex.distractors]
    assert sorted(kinds) == sorted(["same_relation"] * 5 + ["same_entity"] * 2 + ["unrelated"] * 2)
    ent = ex.meta["entity"]
    for d in ex.distractors:
        if d.kind == "same_entity":
            assert d.title == ent and d.extra["relation"] != "capital"
        if d.kind == "unrelated":
            assert d.title != ent and d.extra["relation"] != "capital"
    with pytest.raises(ValueError, match="other relations"):
        make_synthetic_qa(1, n_docs=10, distractors="same_entity")
    with pytest.raises(ValueError, match="Unknown distractor"):
        make_synthetic_qa(1, distractors="weird")
    with pytest.raises(ValueError, match="relation"):
        make_synthetic_qa(1, relation="height")
    assert set(DISTRACTOR_KINDS) == {"same_relation", "same_entity", "unrelated"}


def test_synthetic_qa_all_relations_and_length():
    for name, rel in RELATIONS.items():
        ex = make_synthetic_qa(1, n_docs=3, relation=name, seed=1)[0]
        assert ex.question == rel.question.format(entity=ex.meta["entity"])
        assert ex.answers[0] in ex.gold.text
        assert ex.meta["answer_prefix"] + ex.answers[0] in ex.gold.text
    short = make_synthetic_qa(5, n_docs=4, seed=1)
    long = make_synthetic_qa(5, n_docs=4, seed=1, doc_sentences=4)
    for s, l in zip(short, long):
        assert all(len(b.text) > len(a.text) + 50 for a, b in zip(s.ctxs, l.ctxs))
        assert s.gold.text.split(" ")[:3] == ["The", "capital", "of"] and s.gold.text in l.gold.text


def test_gold_position_specs():
    assert [e.gold_index for e in make_synthetic_qa(6, n_docs=5, gold_position=[0, 2, -1])] == [0, 2, 4, 0, 2, 4]
    assert {e.gold_index for e in make_synthetic_qa(200, n_docs=5)} == set(range(5))
    assert all(e.gold_index == 3 for e in make_kv_retrieval(5, n_docs=6, gold_position=3))
    assert all(e.gold_index == 0 for e in make_needle(5, n_docs=6, gold_position=0))
    with pytest.raises(ValueError, match="outside"):
        make_synthetic_qa(1, n_docs=3, gold_position=3)


def test_kv_retrieval_structure(tok):
    ex = make_kv_retrieval(1, n_docs=5, seed=0, gold_position=2)[0]
    key, value = ex.question, ex.answers[0]
    assert ex.gold.text == f'"{key}": "{value}"' and len(key) == 36
    assert len(ex.distractor_answers) == 4 and value not in ex.distractor_answers
    text = format_prompt_text(ex)
    assert text.startswith("Extract the value corresponding to the specified key in the JSON object below.")
    obj = json.loads(text[text.index("{"): text.index("}") + 1])
    assert obj[key] == value and len(obj) == 5
    assert text.endswith(f'Key: "{key}"\nCorresponding value:')
    short = make_kv_retrieval(1, n_docs=5, key_length=8)[0]
    assert len(short.question) == 8


def test_needle_structure():
    ex = make_needle(1, n_docs=10, n_needles=3, chunk_sentences=4, seed=0)[0]
    needles = [d for d in ex.ctxs if d.kind in ("needle", "gold")]
    assert len(needles) == 3 and ex.gold in needles
    assert ex.gold.text == f"One of the special magic numbers for {ex.question} is: {ex.answers[0]}."
    assert sorted(ex.distractor_answers) == sorted(d.answers[0] for d in needles if not d.isgold)
    text = format_prompt_text(ex)
    assert f"What is the special magic number for {ex.question} mentioned in the provided text?" in text
    with pytest.raises(ValueError, match="n_needles"):
        make_needle(1, n_docs=3, n_needles=4)
