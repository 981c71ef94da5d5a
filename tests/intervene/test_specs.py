"""Intervention specs: each changes what it should and nothing else, leaves no hooks behind (also after
exceptions and failed compositions), and has a content identity that separates any differing field."""

from __future__ import annotations

import math

import pytest
import torch

from focuslens.directions import FocusDirections
from focuslens.core.hooks import attach_hooks, count_hooks
from focuslens.intervene.eager import inject_vectors, split_softmax
from focuslens.core.models import hook_name, model_info
from focuslens.heads.patching import ablate_heads
from focuslens.core.prompts import Span
from focuslens.intervene.specs import Ablate, Compose, InterventionSpec, NoIntervention, as_spec
from focuslens.directions.artefact import Steer
from focuslens.intervene.vector_specs import InjectVectors
from focuslens.intervene.span_specs import SplitSoftmax
from focuslens.tasks import make_synthetic_qa, render

TOKENS = torch.tensor([[0, 5, 17, 33, 8, 91, 120, 44, 7, 60, 250, 13, 99, 150, 31, 77]])
SPAN = Span(4, 9)


def _vec(model, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model_info(model).d_head, generator=g) * scale


def _dirs(model, heads=((1, 2), (0, 1), (1, 3)), seed=0) -> FocusDirections:
    info = model_info(model)
    g = torch.Generator().manual_seed(seed)
    from focuslens.core.attention import query_site

    return FocusDirections(heads=list(heads), vectors=torch.randn(len(heads), info.d_head, generator=g) * 3,
                           fingerprint=info.fingerprint(), model_name=info.name, site=query_site(model), alpha=0.5)


def _capture(model, site: str, run, spec=None):
    """Per-layer tensors at ``site`` (after ``spec``'s edit: its hooks are attached first, so they run
    first) while ``run()`` executes one forward pass."""
    if spec is not None:
        with spec.attach(model):
            return _capture(model, site, run)
    got = {}

    def grab(l):
        def fn(x, hook):
            got[l] = x.detach().clone()
            return x

        return fn

    info = model_info(model)
    with attach_hooks(model, [(hook_name(l, site), grab(l)) for l in range(info.n_layers)]):
        logits = run()
    return logits, got


def _rendered(model):
    return render(make_synthetic_qa(1, n_docs=3, seed=0)[0], model)


# --------------------------------------------------------------------------------------------------
# Effects: neutral settings are exact identities; other heads are untouched bit for bit
# --------------------------------------------------------------------------------------------------


def test_neutral_settings_are_bit_identical(tiny_llama):
    r = _rendered(tiny_llama)
    x = r.tokens[None]
    base = tiny_llama(x)
    heads = [(0, 1), (1, 2)]
    d = _dirs(tiny_llama)
    for spec in (SplitSoftmax(heads, 1.0), InjectVectors({(0, 1): _vec(tiny_llama, 1)}, alpha=0.0),
                 Steer(d, alpha=0.0), NoIntervention(),
                 Compose(SplitSoftmax(heads, 1.0), Steer(d, alpha=0.0))):
        with spec.attach(tiny_llama, r) as h:
            assert torch.equal(tiny_llama(x), base), spec
        assert not h.active and count_hooks(tiny_llama) == 0


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_each_spec_changes_only_its_heads(request, arch):
    model = request.getfixturevalue(arch)
    info = model_info(model)
    base_logits, base_pat = _capture(model, "hook_pattern", lambda: model(TOKENS))
    _, base_z = _capture(model, "hook_z", lambda: model(TOKENS))
    target = (1, 2)
    specs = {
        "split": SplitSoftmax([target], 0.2, span=SPAN),
        "inject": InjectVectors({target: _vec(model, 2)}, alpha=2.0),
        "steer": Steer(_dirs(model, heads=[target]), alpha=2.0),
    }
    for name, spec in specs.items():
        logits, pat = _capture(model, "hook_pattern", lambda: model(TOKENS), spec)
        assert not torch.equal(logits, base_logits), name
        assert torch.equal(pat[0], base_pat[0]), name  # layer 0 is before the edit
        for h in range(info.n_heads):
            same = torch.equal(pat[1][:, h], base_pat[1][:, h])
            assert same == (h != target[1]), (name, h)
    # Ablate: hook_z of the ablated head is zero, every other head of the layer bit-identical.
    spec = Ablate([target])
    logits, z = _capture(model, "hook_z", lambda: model(TOKENS), spec)
    assert not torch.equal(logits, base_logits)
    assert torch.equal(z[0], base_z[0]) and (z[1][:, :, target[1]] == 0).all()
    for h in range(info.n_heads):
        if h != target[1]:
            assert torch.equal(z[1][:, :, h], base_z[1][:, :, h])
    assert count_hooks(model) == 0


def _with(spec: InterventionSpec, model, fn, example=None):
    with spec.attach(model, example):
        return fn()


def test_specs_equal_their_eager_functions(tiny_llama):
    r = _rendered(tiny_llama)
    x = r.tokens[None]
    heads = [(1, 1), (0, 3)]
    vecs = {(0, 2): _vec(tiny_llama, 3), (1, 0): _vec(tiny_llama, 4)}
    kvecs = {(0, 1): _vec(tiny_llama, 3), (1, 0): _vec(tiny_llama, 4)}  # keyed by KV head (2 KV heads)
    d = _dirs(tiny_llama)
    means = {(0, 1): _vec(tiny_llama, 5), (1, 3): _vec(tiny_llama, 6)}
    pairs = [
        (SplitSoftmax(heads, 0.3), lambda: split_softmax(tiny_llama, heads, r.relevant, 0.3)),
        (SplitSoftmax(heads, 0.3, span="distractors"), lambda: split_softmax(tiny_llama, heads, r.distractors, 0.3)),
        (SplitSoftmax(heads, 3.0, span="question"),
         lambda: split_softmax(tiny_llama, heads, r.prompt.spans["question"], 3.0)),
        (SplitSoftmax(heads, 0.3, span=[(2, 5), SPAN]), lambda: split_softmax(tiny_llama, heads, [(2, 5), SPAN], 0.3)),
        (InjectVectors(vecs, alpha=-1.5), lambda: inject_vectors(tiny_llama, vecs, alpha=-1.5)),
        (InjectVectors(kvecs, alpha=1.0, site="key"), lambda: inject_vectors(tiny_llama, kvecs, site="key")),
        (Steer(d, alpha=0.7), lambda: d.apply(tiny_llama, alpha=0.7)),
        (Steer(d, alpha=0.7, k=2), lambda: d.top(2).apply(tiny_llama, alpha=0.7)),
        (Steer(d, alpha="auto", target=0.3), lambda: d.apply(tiny_llama, alpha="auto", tokens=r.tokens, target=0.3)),
        (Ablate(heads), lambda: ablate_heads(tiny_llama, heads)),
        (Ablate(list(means), mode="mean", means=means), lambda: ablate_heads(tiny_llama, list(means), mode="mean", means=means)),
    ]
    for spec, eager in pairs:
        got = _with(spec, tiny_llama, lambda: tiny_llama(x), example=r)
        with eager():
            ref = tiny_llama(x)
        assert torch.equal(got, ref), spec
    # Steer(d, k=2) is Steer(d.top(2)): same content, same spec.
    assert Steer(d, alpha=0.7, k=2) == Steer(d.top(2), alpha=0.7)
    assert count_hooks(tiny_llama) == 0


def test_compose_is_the_nesting_of_its_members(tiny_llama):
    r = _rendered(tiny_llama)
    x = r.tokens[None]
    a = SplitSoftmax([(1, 1)], 0.3)
    b = InjectVectors({(0, 3): _vec(tiny_llama, 7)})
    with a.attach(tiny_llama, r), b.attach(tiny_llama, r):
        nested = tiny_llama(x)
    for c in (Compose(a, b), a + b, sum([a, b]), Compose(Compose(a), NoIntervention(), b)):
        assert _with(c, tiny_llama, lambda: tiny_llama(x), example=r).equal(nested)
        assert c == Compose(a, b)
    assert count_hooks(tiny_llama) == 0


# --------------------------------------------------------------------------------------------------
# Hygiene: no hooks after remove(), after an exception in the block, after a failed composition
# --------------------------------------------------------------------------------------------------


def test_hooks_gone_after_remove_and_after_exceptions(tiny_llama):
    r = _rendered(tiny_llama)
    x = r.tokens[None]
    base = tiny_llama(x)
    spec = SplitSoftmax([(0, 0), (1, 1)], 0.2) + InjectVectors({(0, 1): _vec(tiny_llama, 8)}) + Ablate([(1, 3)])
    h = spec.attach(tiny_llama, r)
    assert count_hooks(tiny_llama) == 5 and h.active  # InjectVectors: the edit and its output check
    assert not torch.equal(tiny_llama(x), base)
    h.remove()
    h.remove()
    assert count_hooks(tiny_llama) == 0 and torch.equal(tiny_llama(x), base)
    with pytest.raises(RuntimeError, match="boom"):
        with spec.attach(tiny_llama, r):
            tiny_llama(x)
            raise RuntimeError("boom")
    assert count_hooks(tiny_llama) == 0 and torch.equal(tiny_llama(x), base)


def test_compose_attach_is_all_or_nothing(tiny_llama):
    r = _rendered(tiny_llama)
    good = SplitSoftmax([(0, 0)], 0.2)
    failing = [
        InjectVectors({(7, 0): _vec(tiny_llama, 9)}),  # unknown layer: fails in inject_vectors
        SplitSoftmax([(1, 0)], 0.5, span=Span(0, 10_000)),  # outside the prompt: fails at attach
        Steer(_dirs(tiny_llama), alpha="auto"),  # fine with an example, fails without one
    ]
    for second in failing:
        with pytest.raises(ValueError):
            (good + InjectVectors({(0, 1): _vec(tiny_llama, 1)}) + second).attach(
                tiny_llama, None if isinstance(second, Steer) else r)
        assert count_hooks(tiny_llama) == 0, second


def test_invalid_specs_fail_at_construction_before_touching_a_model():
    heads = [(0, 0)]
    with pytest.raises(ValueError, match="tau must be > 0"):
        SplitSoftmax(heads, 0.0)
    with pytest.raises(ValueError, match="finite"):
        SplitSoftmax(heads, float("nan"))
    with pytest.raises(ValueError, match="twice"):
        SplitSoftmax([(0, 0), (0, 0)], 0.5)
    with pytest.raises(ValueError, match="at least one"):
        Ablate([])
    with pytest.raises(ValueError, match="finite"):
        InjectVectors({(0, 0): torch.ones(4)}, alpha=math.nan)
    with pytest.raises(ValueError, match="NaN"):
        InjectVectors({(0, 0): torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="'query' or 'key'"):
        InjectVectors({(0, 0): torch.ones(4)}, site="value")
    with pytest.raises(ValueError, match="needs means"):
        Ablate(heads, mode="mean")
    with pytest.raises(ValueError, match="only used with mode='mean'"):
        Ablate(heads, means={(0, 0): torch.ones(4)})
    with pytest.raises(TypeError, match="specs"):
        Compose(SplitSoftmax(heads, 0.5), "not a spec")
    with pytest.raises(AttributeError, match="immutable"):
        SplitSoftmax(heads, 0.5).tau = 0.1


def test_example_rules_need_an_example(tiny_llama):
    r = _rendered(tiny_llama)
    with pytest.raises(ValueError, match="takes its span from the example"):
        SplitSoftmax([(0, 0)], 0.5).attach(tiny_llama)
    with pytest.raises(ValueError, match="no such span"):
        SplitSoftmax([(0, 0)], 0.5, span="nowhere").attach(tiny_llama, r)
    neg = render(make_synthetic_qa(1, n_docs=3, seed=0)[0], tiny_llama, variant="negative")
    with pytest.raises(ValueError, match="no such span"):
        SplitSoftmax([(0, 0)], 0.5).attach(tiny_llama, neg)
    with pytest.raises(ValueError, match="needs the prompt"):
        Steer(_dirs(tiny_llama), alpha="auto").attach(tiny_llama)
    assert count_hooks(tiny_llama) == 0


# --------------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------------


def test_identity_equal_for_equal_content(tiny_llama):
    u = _vec(tiny_llama, 10)
    d = _dirs(tiny_llama)
    pairs = [
        (SplitSoftmax([(0, 1), (1, 2)], 0.2), SplitSoftmax(((0, 1), (1, 2)), 0.2, span="relevant")),
        (SplitSoftmax([(0, 1)], 0.2, span=(3, 7)), SplitSoftmax([[0, 1]], 0.2, span=Span(3, 7))),
        (InjectVectors({(0, 1): u}, alpha=1.0), InjectVectors({(0, 1): u.clone()}, alpha=1)),
        (Steer(d, alpha=0.5), Steer(d._replace(training={"note": "informative"}), alpha=0.5)),
        (Steer(d, alpha=0.5, target=0.1), Steer(d, alpha=0.5, target=0.9)),  # target only matters for auto
        (Steer(d), Steer(d, alpha=0.5)),  # default α is the directions' own
        (Ablate([(1, 1)]), Ablate([(1, 1)], mode="zero")),
        (NoIntervention(), Compose()),
        (Compose(SplitSoftmax([(0, 1)], 0.2)), SplitSoftmax([(0, 1)], 0.2)),
    ]
    for a, b in pairs:
        assert a.identity == b.identity and a.id == b.id and a == b and hash(a) == hash(b), (a, b)
    ident = SplitSoftmax([(0, 1)], 0.2).identity
    assert ident["kind"] == "split_softmax" and ident["heads"] == [[0, 1]] and ident["tau"] == 0.2
    assert "focuslens" in ident
    # A spec snapshots its tensors: editing the caller's tensor afterwards changes neither effect nor id.
    spec = InjectVectors({(0, 1): u})
    before = spec.id
    u.add_(1.0)
    assert spec.id == before


def test_identity_differs_for_any_differing_field(tiny_llama):
    u = _vec(tiny_llama, 11)
    u_ulp = u.clone()
    u_ulp[5] = torch.nextafter(u_ulp[5], torch.tensor(math.inf))
    d = _dirs(tiny_llama)
    d_ulp = d._replace(vectors=d.vectors.clone())
    d_ulp.vectors[2, 0] = torch.nextafter(d_ulp.vectors[2, 0], torch.tensor(math.inf))
    tau = 0.2
    tau_ulp = math.nextafter(tau, 1.0)
    groups = [
        [SplitSoftmax([(0, 1), (1, 2)], tau), SplitSoftmax([(0, 1), (1, 2)], tau_ulp),
         SplitSoftmax([(1, 2), (0, 1)], tau), SplitSoftmax([(0, 1), (1, 2)], tau, span="distractors"),
         SplitSoftmax([(0, 1), (1, 2)], tau, span=(3, 7)), SplitSoftmax([(0, 1)], tau)],
        [InjectVectors({(0, 1): u}), InjectVectors({(0, 1): u_ulp}), InjectVectors({(0, 1): u}, alpha=0.5),
         InjectVectors({(0, 1): u}, site="key"), InjectVectors({(0, 1): u}, pre_rope=True),
         InjectVectors({(0, 2): u}), InjectVectors({(0, 1): u.double()})],
        [Steer(d, alpha=0.5), Steer(d_ulp, alpha=0.5), Steer(d, alpha=math.nextafter(0.5, 1.0)),
         Steer(d, alpha=0.5, k=2), Steer(d, alpha=0.5, heads=[(0, 1), (1, 2), (1, 3)]),
         Steer(d, alpha="auto"), Steer(d, alpha="auto", target=0.25), Steer(d, alpha="auto", per="input"),
         Steer(d._replace(fingerprint={**d.fingerprint, "n_ctx": 1}), alpha=0.5)],
        [Ablate([(0, 1)]), Ablate([(0, 2)]), Ablate([(0, 1), (1, 1)]), Ablate([(1, 1), (0, 1)]),
         Ablate([(0, 1)], mode="mean", means={(0, 1): u}), Ablate([(0, 1)], mode="mean", means={(0, 1): u_ulp})],
    ]
    a, b = SplitSoftmax([(0, 1)], tau), InjectVectors({(0, 1): u})
    groups.append([a + b, b + a, NoIntervention()])
    everything = [s for g in groups for s in g]
    ids = [s.id for s in everything]
    assert len(set(ids)) == len(ids), [(s, i) for s, i in zip(everything, ids) if ids.count(i) > 1]


def test_arithmetic_and_repr(tiny_llama):
    u = _vec(tiny_llama, 12)
    d = _dirs(tiny_llama)
    s = Steer(d, alpha=0.5)
    assert (0.5 * s).alpha == 0.25 and (s * 2).alpha == 1.0 and (-s).alpha == -0.5 and (s / 2).alpha == 0.25
    assert (0.5 * s).heads == s.heads and (0.5 * s).identity["vectors"] == s.identity["vectors"]
    v = InjectVectors({(0, 1): u}, alpha=2.0)
    assert (-v).alpha == -2.0 and (3 * v).alpha == 6.0
    c = 2 * (s + v)
    assert isinstance(c, Compose) and [m.alpha for m in c.members] == [1.0, 4.0]
    assert s + NoIntervention() is s and NoIntervention() + s is s and sum([s]) is s
    with pytest.raises(TypeError, match="no α"):
        2 * SplitSoftmax([(0, 1)], 0.5)
    with pytest.raises(TypeError, match="target"):
        0.5 * Steer(d, alpha="auto")
    # Scaling is exact: 0.5 * Steer(d, α=1) attaches exactly Steer(d, α=0.5).
    x = TOKENS
    assert _with(0.5 * Steer(d, alpha=1.0), tiny_llama, lambda: tiny_llama(x)).equal(
        _with(Steer(d, alpha=0.5), tiny_llama, lambda: tiny_llama(x)))
    for spec, needle in ((SplitSoftmax([(0, 1), (1, 2)], 0.2), "SplitSoftmax(2 heads [L0H1, L1H2], τ=0.2, span='relevant')"),
                         (v, "InjectVectors(1 heads [L0H1], α=2, query"), (s, "Steer(3 heads [L1H2, L0H1, L1H3], α=0.5"),
                         (Ablate([(0, 1)]), "Ablate(1 heads [L0H1], zero)"), (NoIntervention(), "NoIntervention()"),
                         (s + v, "Compose(Steer(")):
        assert needle in repr(spec) and len(repr(spec)) < 200
    assert as_spec(None) is None and as_spec(NoIntervention()) is None and as_spec(s) is s
    assert count_hooks(tiny_llama) == 0


def test_specs_copy_and_pickle_by_content(tiny_llama):
    import copy
    import pickle

    u = _vec(tiny_llama, 13)
    specs = [NoIntervention(), SplitSoftmax([(0, 1)], 0.2), SplitSoftmax([(0, 1)], 0.2, span=(1, 3)),
             InjectVectors({(0, 1): u}, alpha=-1.0, site="key"), Steer(_dirs(tiny_llama), alpha="auto", target=0.3),
             Ablate([(0, 1)], mode="mean", means={(0, 1): u}), SplitSoftmax([(0, 1)], 0.2) + Ablate([(1, 1)])]
    for s in specs:
        for t in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s), copy.copy(s)):
            assert type(t) is type(s) and t == s and t.id == s.id, s
