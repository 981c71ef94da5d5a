"""LitM files: loading, round trips, malformed lines, and N-document examples from the oracle file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from focuslens.tasks import render
from focuslens.tasks.litm import TfidfIndex, build_from_oracle, contains_answer, load_litm, save_litm

DATA = Path(__file__).resolve().parents[1] / "data" / "nq-open-oracle-30.jsonl.gz"


@pytest.fixture(scope="module")
def oracle():
    return load_litm(DATA)


def test_load_oracle_slice(oracle):
    assert len(oracle) == 30
    ex = oracle[0]
    assert ex.question == "who got the first nobel prize in physics"
    assert ex.answers == ["Wilhelm Conrad Röntgen"]
    assert ex.n_docs == 1 and ex.gold_index == 0 and ex.gold.isgold and ex.gold.hasanswer
    assert "nq_annotated_gold" in ex.meta
    assert ex.id == "nq-open-oracle-30.jsonl.gz:1"
    # Every raw line's fields are represented.
    raw = [json.loads(line) for line in gzip.open(DATA, "rt")]
    for r, e in zip(raw, oracle):
        assert e.question == r["question"] and e.answers == r["answers"]
        assert [c.text for c in e.ctxs] == [c["text"] for c in r["ctxs"]]


def test_round_trip_identical(oracle, tmp_path):
    p = save_litm(oracle, tmp_path / "a.jsonl.gz")
    again = load_litm(p)
    assert again == oracle
    # Saving again gives the same bytes (gzip without a timestamp), plain JSONL too.
    q = save_litm(again, tmp_path / "b.jsonl.gz")
    assert p.read_bytes() == q.read_bytes()
    plain = save_litm(oracle, tmp_path / "c.jsonl")
    assert load_litm(plain) == oracle
    # Raw LitM keys survive the trip.
    first = json.loads(gzip.open(p, "rt").readline())
    raw = json.loads(gzip.open(DATA, "rt").readline())
    for k, v in raw.items():
        assert first[k] == v


def test_round_trip_retrieved_distractor_file(tmp_path):
    # The 10/20/30-document files: distractors carry id, score, original_retrieval_index.
    rec = {
        "question": "who wrote x", "answers": ["A. Writer"],
        "ctxs": [
            {"id": "123", "title": "T1", "text": "unrelated", "score": "1.5", "hasanswer": False,
             "original_retrieval_index": 0, "isgold": False},
            {"title": "T2", "text": "x was written by A. Writer", "hasanswer": True, "isgold": True},
        ],
    }
    src = tmp_path / "nq-open-2_total_documents_gold_at_1.jsonl.gz"
    with gzip.open(src, "wt") as f:
        f.write(json.dumps(rec) + "\n")
    ex = load_litm(src)[0]
    assert ex.gold_index == 1 and ex.ctxs[0].extra == {"id": "123", "score": "1.5", "original_retrieval_index": 0}
    out = save_litm([ex], tmp_path / "out.jsonl.gz")
    assert load_litm(out) == [ex]
    d = json.loads(gzip.open(out, "rt").readline())
    assert d["ctxs"][0]["score"] == "1.5" and d["ctxs"][1]["isgold"] is True


@pytest.mark.parametrize(
    "bad, match",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"question": "q", "ctxs": []}), "answers"),
        (json.dumps({"question": "q", "answers": ["a"], "ctxs": [{"title": "t"}]}), "ctxs\\[0\\]"),
        (json.dumps({"question": "q", "answers": "", "ctxs": []}), "answers"),
        (json.dumps([1, 2]), "JSON object"),
    ],
)
def test_malformed_line_names_the_line(tmp_path, bad, match):
    good = gzip.open(DATA, "rt").readline()
    p = tmp_path / "bad.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write(good + good + bad + "\n" + good)
    with pytest.raises(ValueError, match=f"bad.jsonl.gz:3: .*{match}"):
        load_litm(p)


def test_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="lost-in-the-middle"):
        load_litm(tmp_path / "nope.jsonl.gz")


def test_limit(oracle):
    assert load_litm(DATA, limit=5) == oracle[:5]


def test_tfidf_matches_dense_reference():
    texts = ["the cat sat on the mat", "a dog barked at the cat", "cats and dogs and mats", "zebra"]
    idx = TfidfIndex(texts)
    # Dense reference, written independently.
    import math
    import re
    from collections import Counter

    stop = {"the", "a", "on", "at", "and"}
    toks = [[w for w in re.findall(r"\w+", t.lower()) if w not in stop] for t in texts]
    vocab = sorted({w for t in toks for w in t})
    n = len(texts)
    df = {w: sum(w in t for t in toks) for w in vocab}
    idf = np.array([math.log((1 + n) / (1 + df[w])) + 1 for w in vocab])

    def vec(words):
        c = Counter(w for w in words if w in df)
        v = np.array([(1 + math.log(c[w])) if c[w] else 0.0 for w in vocab]) * idf
        return v / (np.linalg.norm(v) or 1)

    dense = np.stack([vec(t) for t in toks])
    q = "Where is the cat and the mat"
    ref = dense @ vec([w for w in re.findall(r"\w+", q.lower()) if w not in stop])
    assert np.allclose(idx.scores(q), ref)
    assert idx.scores("unknownword").tolist() == [0.0] * 4


def test_contains_answer():
    assert contains_answer("Born in 1845, Röntgen won.", ["röntgen"])
    assert not contains_answer("Parisian cafe", ["Paris"])  # whole words only
    assert contains_answer("the U.S. Army", ["U.S."])


@pytest.mark.parametrize("kind", ["random", "hard"])
def test_build_from_oracle(oracle, kind):
    built = build_from_oracle(oracle, n_docs=8, distractors=kind, gold_position=[0, 3, 7], seed=1)
    assert len(built) == 30
    for i, (ex, src) in enumerate(zip(built, oracle)):
        assert ex.n_docs == 8 and ex.gold_index == [0, 3, 7][i % 3]
        assert ex.question == src.question and ex.gold.text == src.gold.text
        texts = [d.text for d in ex.ctxs]
        assert len(set(texts)) == 8
        for d in ex.distractors:
            assert not d.isgold and not contains_answer(f"{d.title} {d.text}", ex.answers)
            assert d.text != src.gold.text and d.extra["source_id"] != src.id
            for a in d.answers:
                assert a in ex.distractor_answers
    assert build_from_oracle(oracle, n_docs=8, distractors=kind, seed=1) == build_from_oracle(
        oracle, n_docs=8, distractors=kind, seed=1
    )


def test_hard_distractors_are_the_most_similar(oracle):
    built = build_from_oracle(oracle, n_docs=4, distractors="hard", gold_position=0, n_examples=5)
    idx = TfidfIndex([f"{e.gold.title} {e.gold.text}" for e in oracle])
    for ex, src in zip(built, oracle):
        s = idx.scores(src.question)
        chosen = [d.extra["source_id"] for d in ex.distractors]
        ranks = {e.id: float(s[k]) for k, e in enumerate(oracle)}
        eligible = [
            e.id for e in oracle
            if e.id != src.id and not contains_answer(f"{e.gold.title} {e.gold.text}", src.answers)
        ]
        best = sorted(eligible, key=lambda i: -ranks[i])[:3]
        assert sorted(ranks[c] for c in chosen) == sorted(ranks[b] for b in best)
        assert [ranks[c] for c in chosen] == sorted((ranks[c] for c in chosen), reverse=True)
    rnd = build_from_oracle(oracle, n_docs=4, distractors="random", gold_position=0, n_examples=5)
    hard_mean = np.mean([idx.scores(e.question)[[int(d.extra["source_id"].split(":")[1]) - 1 for d in e.distractors]].mean() for e in built])
    rnd_mean = np.mean([idx.scores(e.question)[[int(d.extra["source_id"].split(":")[1]) - 1 for d in e.distractors]].mean() for e in rnd])
    assert hard_mean > rnd_mean


def test_build_errors(oracle):
    with pytest.raises(ValueError, match="n_docs"):
        build_from_oracle(oracle, n_docs=31)
    with pytest.raises(ValueError, match="random"):
        build_from_oracle(oracle, distractors="easy")


def test_real_records_render_with_exact_spans(smollm, oracle):
    from test_tasks import assert_spans_exact

    built = build_from_oracle(oracle, n_docs=5, distractors="hard", n_examples=4)
    for variant in ("original", "gold_only", "negative"):
        for ex in built:
            assert_spans_exact(smollm.tokenizer, render(ex, smollm, variant=variant))


def test_shared_oracle_file_when_present():
    # CI has ../shared; the package tests do not need it (the slice above is self-contained).
    full = Path(__file__).resolve().parents[3] / "shared" / "data" / "litm" / "nq-open-oracle.jsonl.gz"
    if not full.exists():
        pytest.skip("../shared/data/litm/nq-open-oracle.jsonl.gz is not here")
    ex = load_litm(full)
    assert len(ex) == 2655 and all(e.gold_index == 0 for e in ex)
    for a, b in zip(ex[:30], load_litm(DATA)):  # the shipped slice is the file's first 30 lines
        assert (a.question, a.answers, a.ctxs, a.meta) == (b.question, b.answers, b.ctxs, b.meta)


# ---- train / validation / test sets split by question (issue 19) ----
from focuslens.tasks import SPLITS, question_split, real_document_splits  # noqa: E402
from focuslens.tasks.metrics import normalize_answer  # noqa: E402


def test_question_split_is_a_pure_function_of_the_question():
    q = "who got the first nobel prize in physics"
    assert question_split(q) == question_split("Who got the first Nobel prize in physics?")  # normalised text
    assert {question_split(f"question {i}") for i in range(200)} == set(SPLITS)
    fr = [sum(question_split(f"question {i}") == s for i in range(3000)) / 3000 for s in SPLITS]
    assert abs(fr[0] - 0.6) < 0.04 and abs(fr[1] - 0.2) < 0.03 and abs(fr[2] - 0.2) < 0.03
    assert question_split(q, fractions=(1, 0, 0)) == "train" and question_split(q, fractions=(0, 0, 1)) == "test"
    with pytest.raises(ValueError, match="summing to 1"):
        question_split(q, fractions=(0.5, 0.2, 0.2))


@pytest.mark.parametrize("kind", ["random", "hard"])
def test_real_document_splits_keep_questions_and_passages_apart(oracle, kind):
    fr = (0.4, 0.3, 0.3)
    sets = real_document_splits(oracle, n_docs=5, distractors=kind, fractions=fr, seed=3)
    assert sets == real_document_splits(oracle, n_docs=5, distractors=kind, fractions=fr, seed=3)  # deterministic
    qs = {s: {normalize_answer(e.question) for e in exs} for s, exs in sets.items()}
    assert sum(len(v) for v in qs.values()) == len(oracle)  # every question once, in one split
    assert not (qs["train"] & qs["test"]) and not (qs["train"] & qs["validation"]) and not (qs["validation"] & qs["test"])
    gold_text = {normalize_answer(e.question): e.ctxs[0].text for e in oracle}
    for split, exs in sets.items():
        own = {gold_text[q] for q in qs[split]}
        for i, e in enumerate(exs):
            assert e.meta["split"] == split and e.id.endswith(f"@{split}")
            assert e.n_docs == 5 and e.gold.isgold and e.gold_index == i % 5  # "cycle"
            for d in e.ctxs:
                assert d.text in own  # distractors only from the split's own questions: no test passage in train
                if not d.isgold:
                    assert not contains_answer(d.text, e.answers)


def test_real_document_splits_every_position_equals_one_build_per_position(oracle):
    sets = real_document_splits(oracle, n_docs=4, positions="every", fractions=(0.5, 0.5, 0.0), seed=1)
    assert sets["test"] == []
    for split in ("train", "validation"):
        qs = [e for e in oracle if question_split(e.question, fractions=(0.5, 0.5, 0.0), seed=1) == split]
        exs = sets[split]
        assert len(exs) == 4 * len(qs)
        for p in range(4):  # the slow reference: one build_from_oracle per gold position
            ref = build_from_oracle(qs, n_docs=4, distractors="random", gold_position=p, seed=1)
            got = exs[p::4]
            assert [e.gold_index for e in got] == [p] * len(qs)
            assert [[d.text for d in e.ctxs] for e in got] == [[d.text for d in r.ctxs] for r in ref]
            assert [e.distractor_answers for e in got] == [r.distractor_answers for r in ref]
            assert all(e.id == f"{r.id}@{split}/p{p}" for e, r in zip(got, ref))


def test_real_document_splits_bad_input(oracle):
    with pytest.raises(ValueError, match="positions must be"):
        real_document_splits(oracle, positions="all")
    with pytest.raises(ValueError, match="fewer than n_docs"):
        real_document_splits(oracle, n_docs=25)


def test_real_document_splits_subset_equals_the_full_build(oracle):
    full = real_document_splits(oracle, n_docs=4, fractions=(0.4, 0.3, 0.3))
    part = real_document_splits(oracle, n_docs=4, fractions=(0.4, 0.3, 0.3), splits=("test",))
    assert list(part) == ["test"] and part["test"] == full["test"]
    with pytest.raises(ValueError, match="splits must name"):
        real_document_splits(oracle, splits=("dev",))


def test_real_documents_script_writes_reproducible_files_and_a_manifest(tmp_path, load_script):
    mod = load_script("experiments/real_documents.py")
    args = ["--oracle", str(DATA), "--n-docs", "4", "--kinds", "random", "--fractions", "0.4", "0.3", "0.3"]
    assert mod.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert mod.main([*args, "--out", str(tmp_path / "b")]) == 0
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert sorted(man["files"]) == ["nq-random4-test-every.jsonl.gz", "nq-random4-test.jsonl.gz",
                                    "nq-random4-train.jsonl.gz", "nq-random4-validation.jsonl.gz"]
    for name, info in man["files"].items():
        a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert a == b and mod.sha256_file(tmp_path / "a" / name) == info["sha256"]  # byte-reproducible
        assert len(load_litm(tmp_path / "a" / name)) == info["examples"]
    assert man["files"]["nq-random4-test-every.jsonl.gz"]["examples"] == 4 * man["files"]["nq-random4-test.jsonl.gz"]["examples"]
    assert mod.main(["--oracle", str(tmp_path / "missing.jsonl.gz"), "--out", str(tmp_path / "c")]) == 2


def test_real_distraction_script_needs_the_sets_first(tmp_path, capsys, load_script):
    mod = load_script("experiments/real_distraction.py")
    assert mod.main(["--sets", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "python experiments/real_documents.py" in capsys.readouterr().err


def test_real_directions_script_needs_the_sets_first(tmp_path, capsys, load_script):
    mod = load_script("experiments/real_directions.py")
    assert mod.main(["--sets", str(tmp_path), "--out", str(tmp_path / "out"), "--records", str(tmp_path / "r")]) == 2
    assert "python experiments/real_documents.py" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "r").exists()


def test_real_directions_are_stored_under_their_content(tmp_path, load_script):
    """Another seed, training set, n, model or head list never names the same folder (no stale vectors)."""
    import argparse

    mod = load_script("experiments/real_directions.py")
    a = argparse.Namespace(out=tmp_path)
    key = {"model": {"weights": "w"}, "train": {"file": "t", "sha256": "1"}, "n_train": 200,
           "val": {"file": "v", "sha256": "2"}, "n_train_val": 12}
    heads = [(0, 1), (2, 3)]
    base, cfg = mod.direction_folder(a, "attention", 0, heads, key)
    assert base == mod.direction_folder(a, "attention", 0, [[0, 1], [2, 3]], dict(key))[0]  # same content, same folder
    assert cfg.seed == 0 and cfg.objective == "attention"
    others = [mod.direction_folder(a, "attention", 1, heads, key)[0],
              mod.direction_folder(a, "likelihood", 0, heads, key)[0],
              mod.direction_folder(a, "attention", 0, heads[::-1], key)[0],
              mod.direction_folder(a, "attention", 0, heads, {**key, "n_train": 100})[0],
              mod.direction_folder(a, "attention", 0, heads, {**key, "model": {"weights": "x"}})[0],
              mod.direction_folder(a, "attention", 0, heads, {**key, "train": {"file": "t", "sha256": "9"}})[0]]
    assert len({base, *others}) == 7


def test_real_directions_selected_file_is_checked_first(tmp_path, capsys, load_script):
    """--selected must hold k and α for every objective × seed asked for; else exit 2 before any loading."""
    mod = load_script("experiments/real_directions.py")
    sel = tmp_path / "selection.json"
    sel.write_text(json.dumps({"attention_s0": {"k": 10, "alpha": 0.25}}))
    argv = ["--sets", str(tmp_path / "no-sets"), "--out", str(tmp_path / "out"), "--records", str(tmp_path / "r")]
    assert mod.main(argv + ["--selected", str(sel), "--objectives", "likelihood"]) == 2
    err = capsys.readouterr().err
    assert "likelihood_s0" in err and "attention_s0" in err and err.count("\n") == 1
    (tmp_path / "bad.json").write_text("{not json")
    assert mod.main(argv + ["--selected", str(tmp_path / "bad.json")]) == 2
    assert "cannot read it as JSON" in capsys.readouterr().err
    assert mod.main(argv + ["--selected", str(sel), "--objectives", "attention"]) == 2  # passes the check: sets missing
    assert "python experiments/real_documents.py" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "r").exists()


def test_real_report_names_carry_a_non_default_dtype(load_script):
    import argparse

    rd = load_script("experiments/real_distraction.py")
    a = argparse.Namespace(kind="random", n_docs=10, dtype="bfloat16")
    assert rd.output_name(a, "report", "md") == "report-random10.md"  # the tracked bfloat16 name, unchanged
    assert rd.output_name(argparse.Namespace(kind="hard", n_docs=20, dtype="float32"), "selection", "json") == \
        "selection-hard20-float32.json"


def test_advance_together_keeps_conditions_level_and_resumes(tmp_path, tiny_llama, monkeypatch, load_script):
    """Conditions advance chunk by chunk together: stopped mid-run, no condition is more than one chunk
    ahead of another; rerun, every condition reaches n from its own records (nothing regenerated)."""
    import argparse

    from focuslens.intervene.span_specs import SplitSoftmax
    from focuslens.testing import capital_example

    rd = load_script("experiments/real_distraction.py")
    test = [capital_example(i) for i in range(6)]
    conds = [("unmodified", "original", None), ("ss", "original", SplitSoftmax([(0, 0), (1, 1)], 0.2)),
             ("gold", "gold_only", None)]
    a = argparse.Namespace(out=tmp_path, n=6, chunk=2, batch_size=2, max_new_tokens=2)
    data = {"file": "toy", "sha256": "0"}
    real, calls = rd.evaluate, []

    class Stop(Exception):
        pass

    stopped = []

    def stop_on_fifth(*args, **kw):
        calls.append(len(args[1]))
        if len(calls) == 5 and not stopped:
            stopped.append(True)
            raise Stop
        return real(*args, **kw)

    monkeypatch.setattr(rd, "evaluate", stop_on_fifth)
    with pytest.raises(Stop):
        rd.advance_together(tiny_llama, test, conds, a, {"m": 1}, data, log="t")
    done = [rd.records_done(rd.record_path(a, {"m": 1}, data, c, v, s)) for c, v, s in conds]
    assert done == [4, 2, 2] and calls == [2, 2, 2, 4, 4]
    calls.clear()
    rd.advance_together(tiny_llama, test, conds, a, {"m": 1}, data, log="t")
    assert [rd.records_done(rd.record_path(a, {"m": 1}, data, c, v, s)) for c, v, s in conds] == [6, 6, 6]
    assert calls == [4, 4, 6, 6, 6]  # the stopped chunk is finished, then the last one; nothing redone
    res = rd.read_condition(tiny_llama, test, "ss", "original", conds[1][2], a, {"m": 1}, data)
    assert len(res.records) == 6


def test_gain_thirds_and_gold_share_tables_against_hand_values(load_script):
    rd = load_script("experiments/real_distraction.py")
    mk = lambda g0, g1, d0, d1, e0, e1: {"before": {"gold": g0, "sink": 0.1, "distractors": d0},  # noqa: E731
                                         "after": {"gold": g1, "sink": 0.1, "distractors": d1},
                                         "em_before": e0, "em_after": e1}
    rows = [mk(0.1, 0.1, 0.5, 0.5, 0.0, 0.0), mk(0.1, 0.0, 0.5, 0.5, 1.0, 0.0),   # gains 0, -0.1
            mk(0.1, 0.3, 0.5, 0.3, 0.0, 0.0), mk(0.1, 0.3, 0.5, 0.3, 1.0, 1.0),   # gains 0.2, 0.2
            mk(0.1, 0.6, 0.5, 0.1, 0.0, 1.0), mk(0.1, 0.7, 0.5, 0.1, 0.0, 1.0)]   # gains 0.5, 0.6
    lines = rd.gain_tercile_lines(rows)
    assert "| lowest | 2 | -0.050 | 0.500 → 0.000 | -50.0 ± 50.0 pts | 0 / 1 |" in lines
    assert "| middle | 2 | +0.200 | 0.500 → 0.500 | +0.0 ± 0.0 pts | 0 / 0 |" in lines
    assert "| highest | 2 | +0.550 | 0.000 → 1.000 | +100.0 ± 0.0 pts | 2 / 0 |" in lines
    assert rd.gain_tercile_lines(rows[:5]) == []  # too few examples to split
    share = rd.share_lines({"x": {"rows": rows}, "empty": {}})
    # 12 states: shares 1/6 (x5 before, + 1/6 after for rows 0), 0/0.5=0 (row 1 after), 0.5 (rows 2-3 after), 6/7, 7/8
    assert "| 0.0–0.2 | 8 | 0.250 ± 0.164 |" in share and "| 0.4–0.6 | 2 | 0.500 ± 0.500 |" in share
    assert "| 0.8–1.0 | 2 | 1.000 ± 0.000 |" in share and "`x`" in "".join(share) and "`empty`" not in "".join(share)


def test_gold_share_counts_an_unmodified_state_once_per_head_set(load_script):
    """Two budgets on the same heads share each example's unmodified state: it is pooled once; a budget
    on other heads has its own unmodified state."""
    rd = load_script("experiments/real_distraction.py")
    row = lambda i, g1, d1, e1: {"id": f"q{i}", "before": {"gold": 0.1, "sink": 0.1, "distractors": 0.9},  # noqa: E731
                                 "after": {"gold": g1, "sink": 0.1, "distractors": d1}, "em_before": 0.0, "em_after": e1}
    same = [[0, 0], [1, 1]]
    budgets = {"oracle": {"heads": same, "rows": [row(0, 0.9, 0.1, 1.0), row(1, 0.9, 0.1, 1.0)]},
               "directions": {"heads": same, "rows": [row(0, 0.7, 0.3, 0.0), row(1, 0.7, 0.3, 1.0)]},
               "other heads": {"heads": [[0, 0]], "rows": [row(0, 0.1, 0.1, 0.0), row(1, 0.1, 0.1, 0.0)]}}
    lines = rd.share_lines(budgets)
    assert "| 0.0–0.2 | 4 | 0.000 ± 0.000 |" in lines  # unmodified: 2 examples × 2 head sets (not 3 budgets)
    assert "| 0.4–0.6 | 2 | 0.000 ± 0.000 |" in lines  # other heads, after
    assert "| 0.6–0.8 | 2 | 0.500 ± 0.500 |" in lines  # directions, after
    assert "| 0.8–1.0 | 2 | 1.000 ± 0.000 |" in lines  # oracle, after
