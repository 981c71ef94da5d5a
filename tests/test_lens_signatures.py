"""FocusLens shows what it takes: typed parameters (no ``**kwargs``), a return type, a docstring with an
example; its parameters mirror the functions and specs underneath; it refuses what the specs refuse."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
import typing

import pytest
import torch

import focuslens as fl
import focuslens.lens as lens_module
from focuslens.core.hooks import count_hooks
from focuslens.directions.config import TrainConfig
from focuslens.evaluation.runner import Decoding
from focuslens.tasks import make_synthetic_qa, render

PUBLIC = sorted(n for n, f in vars(fl.FocusLens).items() if inspect.isfunction(f) and not n.startswith("_"))


def _hint_namespace() -> dict:
    """The lens module's globals plus the names it imports for annotations only (TYPE_CHECKING)."""
    import plotly.graph_objects as go

    from focuslens.directions.data import DirectionExample
    from focuslens.directions.train import QKCache
    from focuslens.evaluation.intervention import Intervene
    from focuslens.evaluation.runner import EvalResult
    from focuslens.tasks.records import RenderedExample, TaskExample

    ns = dict(vars(lens_module))
    ns.update(go=go, DirectionExample=DirectionExample, QKCache=QKCache, Intervene=Intervene,
              EvalResult=EvalResult, RenderedExample=RenderedExample, TaskExample=TaskExample)
    return ns


# ------------------------------------------------------------------------------------------------
# Signatures


def test_the_public_methods_are_the_expected_ones():
    assert {"score", "score_dataset", "use_scores", "heads", "heatmap", "split_softmax", "pasta", "inject",
            "steer", "ablate", "attach", "patch", "find_heads", "attribute", "generate", "evaluate",
            "train_directions"} <= set(PUBLIC)


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_method_lists_and_types_what_it_takes(name):
    fn = getattr(fl.FocusLens, name)
    sig = inspect.signature(fn)
    kinds = {p.name: p.kind for p in sig.parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds.values(), f"FocusLens.{name} takes **kwargs"
    assert inspect.Parameter.VAR_POSITIONAL not in kinds.values(), f"FocusLens.{name} takes *args"
    assert sig.return_annotation is not inspect.Signature.empty, f"FocusLens.{name} has no return type"
    untyped = [p.name for p in list(sig.parameters.values())[1:] if p.annotation is inspect.Parameter.empty]
    assert not untyped, f"FocusLens.{name}: untyped parameters {untyped}"
    assert "Any" not in [str(p.annotation) for p in sig.parameters.values()], f"FocusLens.{name}: a bare Any"
    doc = inspect.getdoc(fn) or ""
    assert ">>>" in doc or "Example" in doc, f"FocusLens.{name}: no example in the docstring"
    assert len(doc.splitlines()) > 1 and not doc.startswith(":"), f"FocusLens.{name}: docstring opens with a role"
    typing.get_type_hints(fn, globalns=_hint_namespace())  # every annotation resolves


def test_help_shows_the_parameters_and_a_readable_first_line():
    import pydoc

    text = pydoc.render_doc(fl.FocusLens.patch, renderer=pydoc.plaintext)
    assert "site" in text and "per_position" in text and "layers" in text and "method" in text
    assert len(inspect.getdoc(fl.FocusLens.patch).splitlines()) > 1
    assert not inspect.getdoc(fl.FocusLens.patch).startswith(":func:")
    assert "'z', 'q', 'k', 'v', 'pattern'" in str(inspect.signature(fl.FocusLens.patch)).replace('"', "'")
    assert "**" not in str(inspect.signature(fl.FocusLens.score_dataset))


@pytest.mark.parametrize("name", ["info", "tokenizer", "attention", "stop_ids"])
def test_the_attributes_have_docstrings(name):
    attr = vars(fl.FocusLens)[name]
    doc = inspect.getdoc(attr)
    assert doc and len(doc) > 20


def _params(fn) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(fn).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n not in ("self", "model", "cls")}


def _mirrors():
    from focuslens.core.generation import greedy_generate
    from focuslens.directions.train import train_focus_directions
    from focuslens.evaluation.runner import evaluate
    from focuslens.heads import finders
    from focuslens.heads.attribution import attribution_patch_heads
    from focuslens.heads.patching import ablate_heads, patch_heads
    from focuslens.plot.figures import head_heatmap
    from focuslens.score.contextual import score_dataset, score_spans

    # (lens method, underlying callable, its parameters the lens expresses otherwise)
    return [
        ("score", score_spans, {"response"}),  # the lens also takes a rendered example (response: a mode)
        ("score_dataset", score_dataset, set()),
        ("heatmap", head_heatmap, {"title"}),  # the lens's default title names the model and n
        ("split_softmax", fl.SplitSoftmax.__init__, {"span"}),  # an explicit span here, a rule in the spec
        ("pasta", fl.Pasta.__init__, {"span"}),
        ("inject", fl.InjectVectors.__init__, set()),
        ("steer", fl.Steer.__init__, {"k"}),  # heads=<int k> is Steer(k=k)
        ("steer", fl.FocusDirections.apply, set()),
        ("ablate", ablate_heads, set()),
        ("ablate", fl.Ablate.__init__, set()),
        ("patch", patch_heads, set()),
        ("attribute", attribution_patch_heads, set()),
        ("generate", greedy_generate, {"forward"}),  # the lens decodes with its own model's forward
        ("evaluate", evaluate, set()),
        ("train_directions", train_focus_directions, {"heads", "_factorised"}),  # int k: top-k; a benchmark switch
        ("find_heads", finders.find_heads, set()),
        ("find_heads", finders.contextual_finder, set()),
        ("find_heads", finders.qrhead_finder, set()),
        ("find_heads", finders.patching_finder, set()),
        ("find_heads", score_dataset, {"response", "examples", "progress"}),  # the finder's own defaults
    ]


def test_parameters_mirror_the_functions_underneath():
    for name, under, other in _mirrors():
        mine = _params(getattr(fl.FocusLens, name))
        theirs = _params(under)
        for p in theirs.values():
            if p.name in other:
                continue
            assert p.name in mine, f"FocusLens.{name} lacks {p.name!r} of {under.__qualname__}"
            if p.default is not p.empty:
                assert mine[p.name].default == p.default and type(mine[p.name].default) is type(p.default), \
                    f"FocusLens.{name}({p.name}=) default {mine[p.name].default!r} != {under.__qualname__}'s {p.default!r}"


@pytest.mark.parametrize("name, cls", [("evaluate", Decoding), ("train_directions", TrainConfig)])
def test_bundle_fields_are_listed(name, cls):
    mine = _params(getattr(fl.FocusLens, name))
    for f in dataclasses.fields(cls):
        assert f.name in mine, f"FocusLens.{name} lacks {cls.__name__}.{f.name}"
        if cls is TrainConfig:  # evaluate's defaults are its own marker "keep the bundle's value" (mirrored above)
            assert mine[f.name].default == f.default and type(mine[f.name].default) is type(f.default), f.name


def test_literal_options_match_the_functions_underneath():
    from focuslens.heads.patching import patch_heads
    from focuslens.score.contextual import score_dataset

    ns = _hint_namespace()
    for name, under in (("patch", patch_heads), ("score_dataset", score_dataset)):
        mine = typing.get_type_hints(getattr(fl.FocusLens, name), globalns=ns)
        theirs = typing.get_type_hints(under)
        for p in ("site", "method"):
            if p in theirs:
                assert typing.get_args(mine[p]) == typing.get_args(theirs[p]), (name, p)


# ------------------------------------------------------------------------------------------------
# Refusals: the wrapper refuses what the spec refuses, with the spec's message


@pytest.fixture(scope="module")
def lens(tiny_llama):
    return fl.FocusLens(tiny_llama)


@pytest.fixture(scope="module")
def rendered(tiny_llama):
    return render(make_synthetic_qa(1, n_docs=3, seed=5)[0], tiny_llama.tokenizer)


def _message(call) -> str:
    with pytest.raises(ValueError) as e:
        call()
    return str(e.value)


BAD_HEADS = [[(True, 0)], [(1.0, 0)], [(0, 1), (0, 1)], []]


@pytest.mark.parametrize("heads", BAD_HEADS)
def test_bad_heads_are_refused_as_the_specs_refuse_them(lens, rendered, heads, tiny_llama):
    span = rendered.relevant
    assert _message(lambda: lens.split_softmax(heads, span, 0.3)) == _message(lambda: fl.SplitSoftmax(heads, 0.3, span=span))
    assert _message(lambda: lens.pasta(heads, span)) == _message(lambda: fl.Pasta(heads, span=span))
    assert _message(lambda: lens.ablate(heads)) == _message(lambda: fl.Ablate(heads))
    assert count_hooks(tiny_llama) == 0


@pytest.mark.parametrize("bad", [True, False, math.nan, math.inf, None, torch.tensor([0.1, 0.2])])
def test_bad_strengths_are_refused_as_the_specs_refuse_them(lens, rendered, bad, tiny_llama):
    span, heads = rendered.relevant, [(1, 0), (0, 3)]
    assert _message(lambda: lens.split_softmax(heads, span, tau=bad)) == \
        _message(lambda: fl.SplitSoftmax(heads, bad, span=span))
    assert _message(lambda: lens.pasta(heads, span, coefficient=bad)) == \
        _message(lambda: fl.Pasta(heads, coefficient=bad, span=span))
    vecs = {(1, 2): torch.randn(16)}
    assert _message(lambda: lens.inject(vecs, alpha=bad)) == _message(lambda: fl.InjectVectors(vecs, alpha=bad))
    d = fl.FocusDirections(heads=heads, vectors=torch.ones(2, 16), fingerprint=lens.info.fingerprint(),
                           model_name=lens.info.name, site="hook_rot_q")
    if bad is not None:  # Steer: alpha=None is the directions' own α
        assert _message(lambda: lens.steer(d, alpha=bad)) == _message(lambda: fl.Steer(d, alpha=bad))
    assert count_hooks(tiny_llama) == 0


def test_tau_zero_and_negative_are_refused(lens, rendered):
    for tau in (0, -0.5):
        assert _message(lambda tau=tau: lens.split_softmax([(0, 1)], rendered.relevant, tau)) == \
            _message(lambda tau=tau: fl.SplitSoftmax([(0, 1)], tau, span=rendered.relevant))


def test_heads_count_is_checked_by_check_count(lens, rendered, tiny_llama):
    lens = fl.FocusLens(tiny_llama)
    lens.use_scores(torch.arange(8.0).reshape(2, 4))
    assert lens.heads(3) == [(1, 3), (1, 2), (1, 1)]
    for k in (True, False, 2.0, 0, -1, 9, "3"):
        with pytest.raises(ValueError, match=r"k must be an int in 1\.\.8"):
            lens.heads(k)
    for k in (True, 2.0, 0):  # an int where heads go is a count too: the same check
        with pytest.raises(ValueError, match=r"SplitSoftmax: heads \(a count k\) must be an int in 1\.\.8"):
            lens.split_softmax(k, rendered.relevant, 0.3)
        with pytest.raises(ValueError, match=r"Ablate: heads \(a count k\) must be an int in 1\.\.8"):
            lens.ablate(k)
    with lens.split_softmax(2, rendered.relevant, tau=0.3) as h:
        assert h.active
    assert count_hooks(tiny_llama) == 0


def test_steer_refuses_a_bool_count_as_steer_does(lens):
    d = fl.FocusDirections(heads=[(1, 0), (0, 3)], vectors=torch.ones(2, 16), fingerprint=lens.info.fingerprint(),
                           model_name=lens.info.name, site="hook_rot_q")
    assert _message(lambda: lens.steer(d, heads=True)) == _message(lambda: fl.Steer(d, k=True))
    with pytest.raises(ValueError, match="needs the prompt"):
        lens.steer(d, alpha="auto")


def test_use_scores_refuses_a_ranking_of_another_shape(tiny_llama, tmp_path):
    lens = fl.FocusLens(tiny_llama)
    with pytest.raises(ValueError, match=r"\(3, 5\).*\(2, 4\)"):
        lens.use_scores(torch.zeros(3, 5))
    other = fl.DatasetScores(mean={"relevant": torch.rand(3, 5)}, stderr={"relevant": torch.zeros(3, 5)},
                             per_example={}, n=2)
    path = other.save(tmp_path / "ranking.json")
    with pytest.raises(ValueError) as e:
        lens.use_scores(path)
    msg = str(e.value)
    assert "(3, 5)" in msg and "(2, 4)" in msg and str(path) in msg and "score_dataset" in msg
    with pytest.raises(ValueError, match="another model"):
        lens.use_scores(other)
    assert lens.scores is None  # nothing attached
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        lens.heads(2, scores=other)
    good = fl.DatasetScores(mean={"relevant": torch.rand(2, 4)}, stderr={"relevant": torch.zeros(2, 4)},
                            per_example={}, n=2)
    assert lens.use_scores(good.save(tmp_path / "good.json")).heads(2) == good.top_k(2)
    with pytest.raises(TypeError, match="use_scores takes"):
        lens.use_scores([[0.1, 0.2]])


def test_ablate_mean_routes_like_ablate_heads(lens, rendered, tiny_llama):
    heads = [(1, 0), (0, 3)]
    toks = rendered.tokens[None]
    with torch.no_grad():
        with fl.heads.ablate_heads(tiny_llama, heads, mode="mean", mean_over=[rendered.tokens]):
            ref = tiny_llama(toks)
        with lens.ablate(heads, mode="mean", mean_over=[rendered.tokens]):
            assert torch.equal(tiny_llama(toks), ref)
    with pytest.raises(ValueError, match="only used with mode='mean'"):
        lens.ablate(heads, mean_over=[rendered.tokens])
    with pytest.raises(ValueError, match="mean_over"):
        lens.ablate(heads, mode="mean")
    with pytest.raises(ValueError, match="mode must be"):
        lens.ablate(heads, mode="half")
    assert count_hooks(tiny_llama) == 0


def test_find_heads_refuses_an_option_of_another_finder(lens, rendered):
    with pytest.raises(ValueError, match="qr_score= is an option of the 'qrhead' finder only"):
        lens.find_heads([rendered], finder="retrieval", qr_score="contrast", progress=False)
    with pytest.raises(ValueError, match="min_gap= is an option of the 'patching' finder only"):
        lens.find_heads([rendered], finder="contextual", min_gap=2.0, progress=False)
    with pytest.raises(ValueError, match="Unknown finder"):
        lens.find_heads([rendered], finder="nope", progress=False)  # type: ignore[arg-type]


def test_evaluate_and_train_refuse_a_bool_where_a_number_goes(lens, rendered):
    with pytest.raises(ValueError, match="alpha"):
        lens.train_directions([], heads=[(0, 1)], alpha=True)  # TrainConfig refuses before any data is read
    with pytest.raises(ValueError, match="seed"):
        lens.train_directions([], heads=[(0, 1)], seed=False)


def test_backend_refuses_before_it_runs(tiny_llama, rendered):
    from focuslens.engine import FusedModel
    from focuslens.testing import tiny_hf_model, tiny_tokenizer

    fused = fl.FocusLens(FusedModel(tiny_hf_model("llama"), tiny_tokenizer()))
    span = rendered.relevant
    assert _message(lambda: fused.split_softmax([(0, 1)], span, tau=True)) == \
        _message(lambda: fl.SplitSoftmax([(0, 1)], True, span=span))
    assert _message(lambda: fused.inject({(0, 1): torch.randn(16)}, alpha=math.nan)) == \
        _message(lambda: fl.InjectVectors({(0, 1): torch.randn(16)}, alpha=math.nan))
    with pytest.raises(TypeError, match="post-RoPE query vectors only"):
        fused.inject({(0, 1): torch.randn(16)}, site="key")


def test_evaluate_keeps_the_decoding_bundle(lens, rendered, tiny_llama):
    dec = Decoding(max_new_tokens=2, stop_at_newline=False)
    got = lens.evaluate([rendered], decoding=dec, progress=False)
    ref = fl.evaluate(tiny_llama, [rendered], decoding=dec, progress=False)
    assert got.predictions == ref.predictions


def test_train_directions_passes_only_the_settings_given(lens, monkeypatch):
    from focuslens.directions import train

    seen = {}
    monkeypatch.setattr(train, "train_focus_directions", lambda model, examples, **kw: seen.update(kw))
    cfg = TrainConfig(seed=3, objective="likelihood")
    lens.train_directions(["x"], heads=[(0, 1)], config=cfg, lr=0.1)
    overrides = {k: v for k, v in seen.items() if k in TrainConfig.field_names()}
    assert seen["config"] is cfg and overrides == {"lr": 0.1} and seen["heads"] == [(0, 1)]


# ------------------------------------------------------------------------------------------------
# Docstrings carry the documentation (issue #35: `help(lens.patch)` was one line with a raw :func:)


def _public_members() -> list[str]:
    return sorted(n for n, f in vars(fl.FocusLens).items()
                  if not n.startswith("_") and (inspect.isfunction(f) or isinstance(f, (property, functools.cached_property))))


@pytest.mark.parametrize("name", _public_members())
def test_every_public_member_has_a_real_docstring(name):
    attr = vars(fl.FocusLens)[name]
    doc = inspect.getdoc(attr) or ""
    lines = [l for l in doc.splitlines() if l.strip()]
    assert len(lines) >= 3, f"FocusLens.{name}: docstring has {len(lines)} lines, want >= 3:\n{doc}"
    first = lines[0]
    assert not first.startswith(":") and len(first) >= 20, f"FocusLens.{name}: first line {first!r} says too little"
    assert ">>>" in doc, f"FocusLens.{name}: no example"
    if inspect.isfunction(attr):
        params = [p for p in inspect.signature(attr).parameters if p != "self"]
        assert "Returns:" in doc, f"FocusLens.{name}: no Returns section"
        if params:
            assert "Args:" in doc, f"FocusLens.{name}: no Args section"
            args = doc.split("Args:", 1)[1].split("Returns:", 1)[0]
            missing = [p for p in params if not re.search(rf"\b{p}\b", args)]
            assert not missing, f"FocusLens.{name}: Args does not mention {missing}"


def test_help_of_patch_is_the_documentation_not_a_pointer():
    import pydoc

    text = pydoc.render_doc(fl.FocusLens.patch, renderer=pydoc.plaintext)
    for needle in ("Args:", "Returns:", "corrupted_tokens", "metric", "Example"):
        assert needle in text
    assert len(inspect.getdoc(fl.FocusLens.patch).splitlines()) >= 15
