"""Batched per-example interventions: a left-padded batch gives every row what it gets alone.

Split softmax and PASTA (a span per row, shifted by the row's left padding), vector injection,
focus directions (fixed α and the per-input ``alpha="auto"``), ablation and compositions, on tiny
models of several architectures (GQA + RoPE, learned positions, Qwen2 biases, Gemma-3 with a sliding
window): logits and patterns to tight tolerance, greedy tokens equal, identities exact, untouched
heads bit-identical, no hooks left (also after an exception), and slow references that apply the
METHOD.md §3 / PASTA formulas by hand, row by row.
"""

from __future__ import annotations

import pytest
import torch

from focuslens.directions import FocusDirections
from focuslens.evaluation.runner import evaluate
from focuslens.testing import greedy_steps, random_directions, random_head_means
from focuslens.core.generation import greedy_generate_batch, left_pad
from focuslens.core.hooks import attach_hooks, count_hooks
from focuslens.intervene.eager import split_softmax
from focuslens.core.forward import forward_with_cache
from focuslens.core.models import hook_name
from focuslens.intervene.specs import Ablate, Compose, InterventionSpec
from focuslens.directions.artefact import Steer
from focuslens.intervene.vector_specs import InjectVectors
from focuslens.intervene.span_specs import Pasta, SplitSoftmax
from focuslens.tasks import make_synthetic_qa, render

N_STEPS = 4


@pytest.fixture(scope="module")
def examples():
    return make_synthetic_qa(4, n_docs=3, seed=1, doc_sentences=1)


def _rendered(model, examples):
    rs = [render(e, model) for e in examples]
    assert len({len(r) for r in rs}) > 1, "different prompt lengths: left padding is exercised"
    assert len({(r.relevant.start, r.relevant.end) for r in rs}) > 1, "different spans per row"
    return rs


def _dirs(model, heads=((1, 2), (0, 1), (1, 3)), seed=0) -> FocusDirections:
    return random_directions(model, heads, seed=seed)


def _means(model, heads, seed=1):
    return random_head_means(model, heads, seed=seed)


def _decode(model, ids, mask, n):
    return greedy_steps(model, ids, mask, n)


def _padded(rs):
    return left_pad([r.tokens for r in rs])


@torch.no_grad()
def _single_vs_batched(model, spec, rs, n=N_STEPS):
    single_t, single_l = [], []
    for r in rs:
        with spec.attach(model, r):
            t, lo = _decode(model, r.tokens[None], None, n)
        single_t.append(t[0])
        single_l.append(lo[0])
    ids, mask, offsets = _padded(rs)
    with spec.attach_batch(model, rs, offsets=offsets):
        bt, bl = _decode(model, ids, mask, n)
    return torch.stack(single_t), torch.stack(single_l), bt, bl


def _specs(model):
    heads = [(0, 0), (0, 3), (1, 1), (1, 2)]
    d = _dirs(model)
    return {
        "split": SplitSoftmax(heads, 0.1),
        "split_distractors": SplitSoftmax(heads, 0.3, span="distractors"),
        "pasta": Pasta(heads, coefficient=0.01),
        "inject": InjectVectors(_means(model, [(0, 1), (1, 0)]), alpha=2.0),
        "steer": Steer(d, alpha=1.0),
        "steer_auto": Steer(d, alpha="auto", target=0.5),
        "ablate_zero": Ablate([(0, 2), (1, 3)]),
        "ablate_mean": Ablate([(0, 2), (1, 3)], mode="mean", means=_means(model, [(0, 2), (1, 3)])),
        "compose": SplitSoftmax(heads, 0.2) + Steer(d, alpha="auto") + Ablate([(1, 0)]),
    }


SPEC_NAMES = ["split", "split_distractors", "pasta", "inject", "steer", "steer_auto", "ablate_zero",
              "ablate_mean", "compose"]


ALL_ARCHS = ["tiny_llama", "tiny_gpt2", "tiny_qwen2", "tiny_gemma3"]
# Per-example specs on every architecture; the example-independent ones (attached once) on two.
CASES = ([(a, n) for n in ("split", "pasta", "steer_auto", "compose") for a in ALL_ARCHS]
         + [(a, n) for n in ("inject", "steer", "ablate_zero", "ablate_mean") for a in ("tiny_llama", "tiny_gemma3")]
         + [("tiny_llama", "split_distractors")])


@pytest.mark.parametrize(("arch", "name"), CASES)
def test_batched_equals_batch_one(request, arch, name, examples):
    model = request.getfixturevalue(arch)
    rs = _rendered(model, examples)
    spec = _specs(model)[name]
    assert spec.batchable
    st, sl, bt, bl = _single_vs_batched(model, spec, rs)
    torch.testing.assert_close(bl, sl, atol=2e-4, rtol=1e-4)
    assert torch.equal(bt, st), "greedy tokens of the batch equal the one-by-one tokens"
    # and the intervention does something (also on each row of the batch)
    ids, mask, _ = _padded(rs)
    _, plain = _decode(model, ids, mask, N_STEPS)
    assert ((bl - plain).abs().amax(-1) > 1e-4).all(), f"{name} must change every row at every step"
    assert count_hooks(model) == 0


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gemma3"])
def test_patterns_of_the_batch_equal_batch_one(request, arch, examples):
    model = request.getfixturevalue(arch)
    rs = _rendered(model, examples)
    names = [hook_name(l, "hook_pattern") for l in range(model.cfg.n_layers)]
    for spec in (SplitSoftmax([(0, 1), (1, 2)], 0.2), Pasta([(0, 1), (1, 2)], coefficient=0.05)):
        ids, mask, offsets = _padded(rs)
        got: dict[str, torch.Tensor] = {}
        grab = lambda n: (lambda x, hook: got.__setitem__(n, x.detach().clone()))  # noqa: E731
        with spec.attach_batch(model, rs, offsets=offsets), attach_hooks(model, [(n, grab(n)) for n in names]):
            model(ids, attention_mask=mask)
        for b, (r, o) in enumerate(zip(rs, offsets)):
            one: dict[str, torch.Tensor] = {}
            grab1 = lambda n: (lambda x, hook: one.__setitem__(n, x.detach().clone()))  # noqa: E731
            with spec.attach(model, r), attach_hooks(model, [(n, grab1(n)) for n in names]):
                model(r.tokens[None])
            for n in names:
                torch.testing.assert_close(got[n][b, :, o:, o:], one[n][0], atol=1e-5, rtol=1e-5)
                assert torch.equal(got[n][b, :, o:, :o], torch.zeros_like(got[n][b, :, o:, :o])), "pad keys"


def _pattern_pair(model, spec, rs, layer):
    """(pre-edit, post-edit) batched patterns of ``layer`` when ``spec`` edits only that layer."""
    ids, mask, offsets = _padded(rs)
    name = hook_name(layer, "hook_pattern")
    box: dict[str, torch.Tensor] = {}
    with attach_hooks(model, [(name, lambda x, hook: box.__setitem__("pre", x.detach().clone()))]), torch.no_grad():
        model(ids, attention_mask=mask)
    with spec.attach_batch(model, rs, offsets=offsets), attach_hooks(
        model, [(name, lambda x, hook: box.__setitem__("post", x.detach().clone()))]
    ), torch.no_grad():
        model(ids, attention_mask=mask)
    return box["pre"], box["post"], offsets


def _by_hand(a_row: list[float], span_cols: set[int], kind: str, strength: float) -> list[float]:
    """METHOD.md §3 (kind="split", strength=τ) or PASTA (strength=coefficient) on one row, in Python floats."""
    pi = sum(v for j, v in enumerate(a_row) if j in span_cols)
    rho = sum(v for j, v in enumerate(a_row) if j not in span_cols)
    if pi == 0 or rho == 0:
        return list(a_row)
    s = pi + rho
    if kind == "split":
        p = pi / s
        inside, outside = p**strength / p, (1 - p**strength) / (1 - p)
    else:
        z = pi + strength * rho
        inside, outside = s / z, strength * s / z
    return [v * (inside if j in span_cols else outside) for j, v in enumerate(a_row)]


@pytest.mark.parametrize("kind", ["split", "pasta"])
def test_slow_reference_row_by_row(tiny_llama, examples, kind):
    rs = _rendered(tiny_llama, examples)
    heads, layer = [(1, 0), (1, 3)], 1
    spec = SplitSoftmax(heads, 0.25) if kind == "split" else Pasta(heads, coefficient=0.02)
    strength = 0.25 if kind == "split" else 0.02
    pre, post, offsets = _pattern_pair(tiny_llama, spec, rs, layer)
    width = pre.shape[-1]
    checked = 0
    for b, (r, o) in enumerate(zip(rs, offsets)):
        cols = set(range(r.relevant.start + o, r.relevant.end + o))
        for h in range(pre.shape[1]):
            for t in list(range(0, width, 17)) + [width - 1]:
                row = pre[b, h, t].double().tolist()
                if h not in (0, 3) or t < r.relevant.start + o:
                    assert torch.equal(post[b, h, t], pre[b, h, t]), "unedited heads / rows are bit-identical"
                    continue
                want = torch.tensor(_by_hand(row, cols, kind, strength), dtype=torch.float64)
                torch.testing.assert_close(post[b, h, t].double(), want, atol=1e-6, rtol=1e-5)
                checked += 1
    assert checked > 20


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gemma3"])
def test_identities_are_exact_in_a_batch(request, arch, examples):
    model = request.getfixturevalue(arch)
    rs = _rendered(model, examples)
    ids, mask, offsets = _padded(rs)
    with torch.no_grad():
        base = model(ids, attention_mask=mask)
        d = _dirs(model)
        for spec in (SplitSoftmax([(0, 1), (1, 2)], 1.0), Pasta([(0, 1), (1, 2)], coefficient=1.0),
                     InjectVectors(_means(model, [(0, 1)]), alpha=0.0), Steer(d, alpha=0.0)):
            with spec.attach_batch(model, rs, offsets=offsets):
                assert torch.equal(model(ids, attention_mask=mask), base), spec


def test_untouched_heads_bit_identical_in_a_batch(tiny_llama, examples):
    rs = _rendered(tiny_llama, examples)
    for spec in (SplitSoftmax([(1, 2)], 0.2), Pasta([(1, 2)], coefficient=0.01)):
        pre, post, _ = _pattern_pair(tiny_llama, spec, rs, 1)
        for h in range(4):
            assert torch.equal(post[:, h], pre[:, h]) == (h != 2)


def test_hooks_gone_after_an_exception_mid_batch(tiny_llama, examples, monkeypatch):
    import focuslens.evaluation.runner as ev

    rs = _rendered(tiny_llama, examples)
    spec = SplitSoftmax([(0, 1)], 0.2) + Steer(_dirs(tiny_llama), alpha="auto")
    calls = []
    real = ev.greedy_generate_batch

    def crash(model, prompts, **kw):
        calls.append(count_hooks(model))
        if len(calls) == 2:
            raise RuntimeError("boom mid-run")
        return real(model, prompts, **kw)

    monkeypatch.setattr(ev, "greedy_generate_batch", crash)
    with pytest.raises(RuntimeError, match="boom"):
        evaluate(tiny_llama, rs, intervene=spec, batch_size=2, progress=False, max_new_tokens=3, engine="eager")
    assert calls[0] > 0 and count_hooks(tiny_llama) == 0
    # A forward pass of another batch size than the spec was attached for raises, and leaves nothing.
    ids, mask, offsets = _padded(rs)
    with pytest.raises(ValueError, match="batch of 4 rows"):
        with SplitSoftmax([(0, 1)], 0.2).attach_batch(tiny_llama, rs, offsets=offsets):
            tiny_llama(ids[:2], attention_mask=mask[:2])
    with pytest.raises(ValueError, match="batch of 4 rows"):
        with Steer(_dirs(tiny_llama), alpha="auto").attach_batch(tiny_llama, rs, offsets=offsets):
            tiny_llama(ids[:2], attention_mask=mask[:2])
    assert count_hooks(tiny_llama) == 0


def test_attach_batch_validation(tiny_llama, examples):
    rs = _rendered(tiny_llama, examples)
    spec = SplitSoftmax([(0, 1)], 0.2)
    with pytest.raises(ValueError, match="one offset"):
        spec.attach_batch(tiny_llama, rs, offsets=[0, 0])
    with pytest.raises(ValueError, match="offsets\\[1\\]"):
        spec.attach_batch(tiny_llama, rs[:2], offsets=[0, -1])
    with pytest.raises(ValueError, match="same width"):
        spec.attach_batch(tiny_llama, rs[:2], offsets=[0, 0])
    with pytest.raises(ValueError, match="one span"):
        split_softmax(tiny_llama, [(0, 1)], rs[0].relevant, 0.2, offsets=[0, 3])
    assert count_hooks(tiny_llama) == 0


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_evaluate_batches_every_spec_and_answers_equal_batch_one(tiny_llama, examples, name):
    spec = _specs(tiny_llama)[name]
    one = evaluate(tiny_llama, examples, intervene=spec, batch_size=1, progress=False, max_new_tokens=5)
    bat = evaluate(tiny_llama, examples, intervene=spec, batch_size=3, progress=False, max_new_tokens=5)
    assert [r["batch_size"] for r in one.records] == [1, 1, 1, 1]
    assert [r["batch_size"] for r in bat.records] == [3, 3, 3, 1]
    assert bat.predictions == one.predictions
    assert bat.config_hash == one.config_hash  # batch size is not part of the configuration
    assert count_hooks(tiny_llama) == 0


def test_unintervened_batches_near_tie_rule(tiny_llama, examples):
    """Without an intervention, batched greedy answers equal one-by-one answers (the near-tie rule:
    rounding may only flip near-tied tokens; these prompts have none, so the tokens are equal)."""
    rs = _rendered(tiny_llama, examples)
    one = evaluate(tiny_llama, rs, batch_size=1, progress=False, max_new_tokens=6)
    bat = evaluate(tiny_llama, rs, batch_size=4, progress=False, max_new_tokens=6)
    assert bat.predictions == one.predictions
    bt = greedy_generate_batch(tiny_llama, [r.tokens for r in rs], max_new_tokens=6, stop_at_newline=False,
                               stop_ids=[])
    # the smallest top-2 logit gap along the one-by-one decoding: far above float32 rounding of the batch
    gaps = []
    for r, (ids, _) in zip(rs, bt):
        seq = torch.cat([r.tokens, torch.tensor(ids[:-1], dtype=torch.long)])[None]
        with torch.no_grad():
            lo = tiny_llama(seq)[0, len(r) - 1:].float()
        top = lo.topk(2, -1).values
        gaps.append(float((top[:, 0] - top[:, 1]).min()))
        assert lo.argmax(-1).tolist() == ids
    assert min(gaps) > 1e-4


class _Unbatchable(InterventionSpec):
    """A per-example spec without a batched attach: evaluate must fall back to batch 1 by itself."""

    kind = "test_unbatchable"
    __slots__ = ("inner",)

    def __init__(self, inner):
        self.inner = inner
        self._freeze()

    @property
    def per_example(self) -> bool:
        return True

    def _identity(self):
        return {"inner": self.inner.identity}

    def _ctor(self):
        return (self.inner,), {}

    def attach(self, model, example=None):
        return self.inner.attach(model, example)


def test_a_spec_without_attach_batch_falls_back_to_batch_one(tiny_llama, examples):
    spec = _Unbatchable(SplitSoftmax([(0, 1)], 0.2))
    assert not spec.batchable and not Compose(spec, Ablate([(0, 0)])).batchable
    with pytest.raises(TypeError, match="no batched attach"):
        spec.attach_batch(tiny_llama, examples[:1], offsets=[0])
    res = evaluate(tiny_llama, examples, intervene=spec, batch_size=4, progress=False, max_new_tokens=4)
    assert [r["batch_size"] for r in res.records] == [1, 1, 1, 1]
    ref = evaluate(tiny_llama, examples, intervene=spec.inner, batch_size=4, progress=False, max_new_tokens=4)
    assert res.predictions == ref.predictions


def test_sliding_window_cached_steps_edit_the_right_keys(tiny_gemma3, examples):
    """Gemma-3's sliding layer keeps only the last keys at a cached step: the span is still found
    (the hook reads the sequence length from the call), and cached decoding equals full forwards."""
    from focuslens.testing import naive_greedy

    r = _rendered(tiny_gemma3, examples)[0]
    heads = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 1)]
    with split_softmax(tiny_gemma3, heads, r.relevant, 0.05), torch.no_grad():
        t, _ = _decode(tiny_gemma3, r.tokens[None], None, 6)
        assert t[0].tolist() == naive_greedy(tiny_gemma3, r.tokens, 6)
    assert count_hooks(tiny_gemma3) == 0


def test_bench_dry_run(tmp_path, load_script):
    mod = load_script("benchmarks/bench_batched_eval.py")
    out = mod.main(["--dry-run", "--output", str(tmp_path / "bench.json")])
    assert out["n"] >= 4 and out["mismatches"] == 0
    assert out["batch_8"]["seconds_per_example"] > 0 and out["batch_1"]["seconds_per_example"] > 0
    assert (tmp_path / "bench.json").exists()


def test_sliding_window_continuation_of_a_repeated_cache(tiny_gemma3, examples):
    """The teacher-forced margins path (prefill, repeat the cache, right-padded continuations) under
    split softmax on a sliding-window layer equals full forward passes."""
    from focuslens.core.forward import repeat_cache

    r = _rendered(tiny_gemma3, examples)[0]
    g = torch.Generator().manual_seed(7)
    conts = torch.randint(1, 300, (2, 5), generator=g)
    heads = [(0, 0), (0, 2), (1, 1)]
    with split_softmax(tiny_gemma3, heads, r.relevant, 0.1), torch.no_grad():
        _, cache = forward_with_cache(tiny_gemma3, r.tokens[None])
        for _ in range(2):  # the same prefill cache reused, as margins does chunk after chunk
            lo, _ = forward_with_cache(tiny_gemma3, conts, repeat_cache(tiny_gemma3, cache, 2))
            full = tiny_gemma3(torch.cat([r.tokens[None].expand(2, -1), conts], 1))[:, -5:]
            torch.testing.assert_close(lo, full, atol=1e-4, rtol=1e-4)
    assert count_hooks(tiny_gemma3) == 0
