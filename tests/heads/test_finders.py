"""Head finders (focuslens.heads.finders) against slow references on tiny models."""

from __future__ import annotations

import pytest
import torch

from focuslens.heads.finders import FINDERS, compare_finders, find_heads, needle_answer_tokens, patching_finder, qrhead_finder, retrieval_finder, retrieval_scores, spearman, top_k_overlap
from focuslens.plot.figures import finder_heatmaps
from focuslens.core.hooks import attach_hooks, count_hooks
from focuslens.core.models import hook_name
from focuslens.core.prompts import Span
from focuslens.score.ranking import DatasetScores, contextual_heads
from focuslens.tasks import render
from focuslens.testing import capital_example


@pytest.fixture(scope="module")
def rendered(tok):
    return [render(capital_example(i, 3), tok, chat=True) for i in range(3)]


def _full_patterns(model, tokens):
    """Slow reference: every layer's full pattern from run_with_cache ([head, q, k] each)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None])
    L = model.cfg.n_layers
    return [cache[hook_name(l, "hook_pattern")][0].float() for l in range(L)]


def test_needle_answer_tokens_are_the_needles_own_tokens(tiny_llama, rendered):
    r = rendered[0]
    ans = needle_answer_tokens(tiny_llama.tokenizer, r.tokens, r.relevant, r.answers)
    text = tiny_llama.tokenizer.decode(r.tokens[ans.slice].tolist())
    assert r.answers[0] in text and r.relevant.start <= ans.start < ans.end <= r.relevant.end
    # the shortest window: dropping either end loses the answer
    assert r.answers[0] not in tiny_llama.tokenizer.decode(r.tokens[ans.start + 1:ans.end].tolist())
    assert r.answers[0] not in tiny_llama.tokenizer.decode(r.tokens[ans.start:ans.end - 1].tolist())
    with pytest.raises(ValueError, match="verbatim"):
        needle_answer_tokens(tiny_llama.tokenizer, r.tokens, r.relevant, ["Zzqx"])


def test_retrieval_score_counts_a_hand_built_copy_event(tiny_llama, rendered):
    """Overwrite hook_pattern with known one-hot rows: the copy-event count is known exactly."""
    r = rendered[1]
    N = len(r.tokens)
    ans = needle_answer_tokens(tiny_llama.tokenizer, r.tokens, r.relevant, r.answers)
    m = len(ans)
    assert m >= 2, "the test needs an answer of at least two tokens"
    other_needle = next(j for j in range(r.relevant.start, r.relevant.end)
                        if int(r.tokens[j]) not in set(r.tokens[ans.slice].tolist()))
    outside = r.distractors[0].start + 1   # a distractor token: never an event

    def force(l):
        def fn(x, hook=None):
            x = torch.zeros_like(x)
            x[..., 0] = 1.0                 # every head: all mass on the sink (token 0, outside the needle)
            for i in range(m):
                row = N - 1 + i             # the row that predicts answer token i
                if l == 0:
                    x[0, 1, row] = 0
                    x[0, 1, row, ans.start + i] = 1.0          # L0H1 copies every answer token
                    x[0, 2, row] = 0
                    x[0, 2, row, other_needle] = 1.0           # L0H2: in the needle, wrong token
                if l == 1:
                    x[0, 3, row] = 0
                    x[0, 3, row, ans.start + i if i == 0 else outside] = 1.0  # L1H3: one step of m
            return x
        return fn

    with attach_hooks(tiny_llama, [(hook_name(l, "hook_pattern"), force(l)) for l in range(2)], label="force"):
        got = retrieval_scores(tiny_llama, r.tokens, needle=r.relevant, answer=ans)
    expected = torch.zeros(2, 4)
    expected[0, 1] = 1.0
    expected[1, 3] = 1.0 / m
    torch.testing.assert_close(got, expected)


def test_retrieval_finder_matches_a_loop_over_full_patterns(tiny_llama, rendered):
    ds = retrieval_finder(tiny_llama, rendered, progress=False)
    assert isinstance(ds, DatasetScores) and ds.mean["relevant"].shape == (2, 4) and ds.n == 3
    for k, r in enumerate(rendered):
        ans = needle_answer_tokens(tiny_llama.tokenizer, r.tokens, r.relevant, r.answers)
        resp = r.tokens[ans.slice]
        full = torch.cat([r.tokens, resp])
        pats = _full_patterns(tiny_llama, full)
        N, ref = len(r.tokens), torch.zeros(2, 4)
        for l in range(2):
            for h in range(4):
                for i in range(len(resp)):
                    j = int(pats[l][h, N - 1 + i].argmax())
                    if r.relevant.start <= j < r.relevant.end and int(full[j]) == int(resp[i]):
                        ref[l, h] += 1
        torch.testing.assert_close(ds.per_example["relevant"][k], ref / len(resp))


def test_retrieval_finder_sees_a_copying_head(tiny_llama, rendered):
    """A head forced to attend to the needle's answer tokens scores 1; the finder is not always 0."""
    r = rendered[2]
    N = len(r.tokens)
    ans = needle_answer_tokens(tiny_llama.tokenizer, r.tokens, r.relevant, r.answers)

    def fn(x, hook=None):
        x = x.clone()
        for i in range(len(ans)):
            x[0, 0, N - 1 + i] = 0
            x[0, 0, N - 1 + i, ans.start + i] = 1.0
        return x

    with attach_hooks(tiny_llama, [(hook_name(1, "hook_pattern"), fn)], label="copy head"):
        ds = retrieval_finder(tiny_llama, [r], progress=False)
    assert float(ds.mean["relevant"][1, 0]) == 1.0
    assert contextual_heads(ds, 1) == [(1, 0)]


def test_qrhead_matches_a_loop_over_documents(tiny_llama, rendered):
    ds = qrhead_finder(tiny_llama, rendered, progress=False)
    dc = qrhead_finder(tiny_llama, rendered, qr_score="contrast", progress=False)
    for k, r in enumerate(rendered):
        pats = _full_patterns(tiny_llama, r.tokens)
        q = r.question_span
        gold, contrast = torch.zeros(2, 4), torch.zeros(2, 4)
        for l in range(2):
            for h in range(4):
                per_doc = [float(pats[l][h, q.start:q.end, d.start:d.end].sum(-1).mean()) for d in r.doc_spans]
                g = r.gold_position
                gold[l, h] = per_doc[g]
                others = [v for i, v in enumerate(per_doc) if i != g]
                contrast[l, h] = per_doc[g] - sum(others) / len(others)
        torch.testing.assert_close(ds.per_example["relevant"][k], gold, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(dc.per_example["relevant"][k], contrast, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ds.mean["contrast"], dc.mean["relevant"])
    with pytest.raises(ValueError, match="qr_score"):
        qrhead_finder(tiny_llama, rendered, qr_score="null")


def test_patching_finder_matches_patch_heads(tiny_llama):
    """Normalised z-patching effect equals patch_heads on the same pair (tiny gap allowed on a random model)."""
    from focuslens.heads.patching import logit_diff_metric, make_corrupted_pair, patch_heads

    exs = [capital_example(i, 3) for i in range(2)]
    ds = patching_finder(tiny_llama, exs, min_gap=1e-6, progress=False)
    assert ds.n == 2 and ds.mean["relevant"].shape == (2, 4)
    for k, ex in enumerate(exs):
        clean, bad = make_corrupted_pair(tiny_llama, ex)
        metric = logit_diff_metric(tiny_llama, clean.answers[0], bad.answers[0])
        with torch.no_grad():
            mc, mx = float(metric(tiny_llama(clean.tokens[None]))), float(metric(tiny_llama(bad.tokens[None])))
        raw = patch_heads(tiny_llama, bad.tokens[None], clean.tokens[None], metric, site="z")
        torch.testing.assert_close(ds.per_example["raw"][k], raw)
        torch.testing.assert_close(ds.per_example["relevant"][k], (raw - mx) / (mc - mx))
    with pytest.raises(ValueError, match="0 of 2 examples were usable"):
        patching_finder(tiny_llama, exs, min_gap=1e6, progress=False)
    with pytest.raises(ValueError, match="min_gap"):
        patching_finder(tiny_llama, exs, min_gap=0, progress=False)


@pytest.mark.parametrize("finder", FINDERS)
def test_every_finder_returns_layer_head_and_leaves_no_hooks(tiny_llama, rendered, finder):
    kw = {"min_gap": 1e-6} if finder == "patching" else {}
    ds = find_heads(tiny_llama, rendered, finder=finder, progress=False, **kw)
    assert isinstance(ds, DatasetScores)
    assert ds.mean["relevant"].shape == ds.stderr["relevant"].shape == (2, 4)
    assert ds.per_example["relevant"].shape == (ds.n, 2, 4)
    assert finder in ds.response_mode and len(ds.top_k(3)) == 3
    assert count_hooks(tiny_llama) == 0


def test_finder_hooks_are_removed_after_an_exception(tiny_llama, rendered):
    def boom(x, hook=None):
        raise RuntimeError("boom")

    with attach_hooks(tiny_llama, [(hook_name(1, "hook_pattern"), boom)], label="boom"):
        with pytest.raises(RuntimeError, match="boom"):
            retrieval_finder(tiny_llama, rendered[:1], progress=False)
        assert count_hooks(tiny_llama) == 1  # only the test's own hook
    assert count_hooks(tiny_llama) == 0


def test_bad_input(tiny_llama, rendered):
    with pytest.raises(ValueError, match="Unknown finder"):
        find_heads(tiny_llama, rendered, finder="induction")
    with pytest.raises(ValueError, match="no examples"):
        find_heads(tiny_llama, [], finder="qrhead")
    with pytest.raises(TypeError, match="TaskExample or RenderedExample"):
        find_heads(tiny_llama, ["a prompt"], finder="retrieval")
    r = rendered[0]
    with pytest.raises(ValueError, match="must lie in the prompt"):
        retrieval_scores(tiny_llama, r.tokens, needle=r.relevant, answer=Span(0, 1))


def test_spearman_and_overlap_against_hand_values():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, a ** 3) == pytest.approx(1.0)          # rank-based: monotone maps are 1
    b = torch.tensor([[2.0, 1.0], [3.0, 4.0]])                  # ranks 2,1,3,4 vs 1,2,3,4: 1 - 6*2/(4*15)
    assert spearman(a, b) == pytest.approx(1 - 6 * 2 / (4 * 15))
    t = torch.tensor([[1.0, 1.0], [3.0, 4.0]])                  # ties get average ranks (1.5, 1.5, 3, 4)
    ra = torch.tensor([1.0, 2, 3, 4]) - 2.5
    rt = torch.tensor([1.5, 1.5, 3, 4]) - 2.5
    assert spearman(a, t) == pytest.approx(float((ra * rt).sum() / (ra.norm() * rt.norm())))
    assert top_k_overlap(a, b, 2) == 2 and top_k_overlap(a, -a, 2) == 0
    c = compare_finders({"a": a, "b": b, "neg": -a}, k=2)
    assert c["overlap"][0] == [2, 2, 0] and c["spearman"][0][2] == pytest.approx(-1.0)
    assert c["top"]["a"] == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match="at least two"):
        compare_finders({"a": a})


def test_finder_heatmaps_one_panel_per_finder(tiny_llama, rendered):
    res = {f: find_heads(tiny_llama, rendered, finder=f, progress=False) for f in ("contextual", "qrhead")}
    fig = finder_heatmaps(res, top_k=3, title="t")
    assert len(fig.data) == 4 and fig.data[0].type == "heatmap" and fig.data[2].type == "heatmap"
    torch.testing.assert_close(torch.tensor(fig.data[2].z, dtype=torch.float32), res["qrhead"].mean["relevant"])
    assert len(fig.data[1].x) == 3


def test_compare_methods_quick_smoke_run_resumes(tmp_path, load_script):
    """experiments/compare_methods.py --quick: finders, cells, docs table and figure; a rerun computes nothing."""
    import json

    mod = load_script("experiments/compare_methods.py")
    argv = ["--quick", "--out", str(tmp_path), "--tasks", "syn10,gold_only"]
    mod.main(argv)
    doc = (tmp_path / "comparison.md").read_text()
    assert mod.MARK_START in doc and "| contextual | split softmax" in doc and "### Finder agreement" in doc
    assert (tmp_path / "figures" / "compare_finders.html").exists()
    cells = sorted((tmp_path / "cells").rglob("*.json"))
    assert {c.parent.name for c in cells} == {"syn10", "gold_only"}
    base = json.loads((tmp_path / "cells" / "syn10" / "none-unmodified.json").read_text())
    assert base["n"] == 2 and len(base["em"]) == 2
    stamps = {c: c.stat().st_mtime_ns for c in cells}
    mod.main(argv)   # resumed: every cell is reused as it is
    assert {c: c.stat().st_mtime_ns for c in cells} == stamps
    # the table is rebuilt from the cache without a model, keeping the prose around it
    (tmp_path / "comparison.md").write_text("# prose before\n\n" + doc + "\nprose after\n")
    mod.main(argv[:3] + ["--report"])
    doc2 = (tmp_path / "comparison.md").read_text()
    assert doc2.startswith("# prose before") and doc2.rstrip().endswith("prose after") and doc2.count(mod.MARK_START) == 1


def test_one_contextual_ranking_one_default(tiny_llama, rendered):
    """find_heads(finder="contextual") and score_dataset share the paper's default (the model's own
    answer); the gold-answer ranking that was find_heads' default before 0.2 is asked for by name."""
    import focuslens as fl

    default = find_heads(tiny_llama, rendered, finder="contextual", progress=False)
    ref = fl.score_dataset(tiny_llama, rendered, progress=False)
    assert "generate" in default.response_mode
    assert torch.equal(default.mean["relevant"], ref.mean["relevant"])
    gold = find_heads(tiny_llama, rendered, finder="contextual", response="gold", progress=False)
    ref_gold = fl.score_dataset(tiny_llama, rendered, response="gold", progress=False)
    assert torch.equal(gold.mean["relevant"], ref_gold.mean["relevant"])
    assert not torch.equal(gold.mean["relevant"], default.mean["relevant"])
