"""Notebook manners (issue #35): every result type prints as a short summary, not its tensors
(``repr(FocusDirections)`` was 10,308 characters), and saved artefacts record the installed versions."""

from __future__ import annotations

from importlib.metadata import version

import pytest
import torch

import focuslens as fl
from focuslens.core.prompts import build_prompt
from focuslens.testing import capital_example

LIMIT = 300  # characters: one line in a notebook, two at most


def _long_record():
    from focuslens.tasks import Document, TaskExample

    docs = [Document(title=f"Title {i} " * 5, text=f"A long passage number {i}. " * 40) for i in range(20)]
    return TaskExample(question="What is the capital of the country that has the longest name? " * 4,
                       answers=["Answer one", "Answer two", "Answer three", "Answer four"], ctxs=docs,
                       gold_index=7, id="long-record")


@pytest.fixture(scope="module")
def objects(tiny_llama):
    """One object of every type a notebook user prints, at a realistic size (30 × 9 heads where it matters)."""
    from focuslens.directions.data import make_direction_examples
    from focuslens.directions.objectives import cache_qk
    from focuslens.evaluation.margins import MarginResult
    from focuslens.evaluation.sweeps import AlphaSelection
    from focuslens.heads.patching import logit_diff_metric
    from focuslens.score.ranking import DatasetScores, HeadScores
    from focuslens.tasks import render

    torch.manual_seed(0)
    lens = fl.FocusLens(tiny_llama)
    tok = lens.tokenizer
    rendered = [render(capital_example(i), tok) for i in range(3)]
    ds = lens.score_dataset(rendered, response="gold", progress=False)
    big = {n: torch.rand(30, 9) for n in ["relevant", "sink", *[f"distractor_{i}" for i in range(19)]]}
    heads50 = [(l, h) for l in range(30) for h in range(9)][:50]
    dirs = fl.FocusDirections(heads=heads50, vectors=torch.randn(50, 64),
                              fingerprint={"d_head": 64, "n_layers": 30, "n_heads": 9}, model_name="SmolLM2-135M-Instruct",
                              training={"losses": list(range(1000))})
    small = lens.train_directions(make_direction_examples(tiny_llama, [capital_example(i) for i in range(2)],
                                                          responses=["B0.", "C1."], progress=False),
                                  heads=[(0, 1), (1, 2)], steps=2, progress=False)
    prompt = build_prompt(tok, [x for i in range(12) for x in ((f"doc_{i}", f"Passage {i} says something. " * 8), "\n")])
    dx = make_direction_examples(tiny_llama, [capital_example(0)], responses=["B0."], progress=False)
    handle = lens.split_softmax([(0, 1), (1, 2)], rendered[0].relevant, tau=0.2)
    handle.remove()
    return {
        "FocusLens": lens,
        "DatasetScores (tiny model)": ds,
        "DatasetScores (30x9, 21 scores)": DatasetScores(mean=big, stderr=big, per_example={n: t[None] for n, t in big.items()},
                                                         n=1, responses=["x" * 500], indices=[0], model="SmolLM2"),
        "HeadScores": lens.score(rendered[0], response="gold"),
        "HeadScores (30x9, 21 scores)": HeadScores(scores=big, columns=torch.rand(30, 9, 2000), response=fl.Span(1990, 2000),
                                                   method="qk"),
        "FocusDirections (50 heads)": dirs,
        "FocusDirections (trained)": small,
        "Steer": fl.Steer(dirs, alpha=0.5),
        "SplitSoftmax": fl.SplitSoftmax(heads50, tau=0.2),
        "Pasta": fl.Pasta(heads50),
        "Ablate": fl.Ablate(heads50),
        "InjectVectors": fl.InjectVectors({h: torch.randn(64) for h in heads50}),
        "Compose": fl.Compose(fl.SplitSoftmax(heads50, tau=0.2), fl.Ablate(heads50[:5])),
        "HookHandle": handle,
        "EvalResult": lens.evaluate([capital_example(0)], progress=False, max_new_tokens=2),
        "LabelledPrompt (24 segments)": prompt,
        "RenderedExample": rendered[0],
        "TaskExample (20 long documents)": _long_record(),
        "Document": _long_record().ctxs[0],
        "ModelInfo": lens.info,
        "TrainConfig": fl.TrainConfig(),
        "Decoding": fl.Decoding(),
        "LogitDiff": logit_diff_metric(tiny_llama, 5, 6),
        "MarginResult": MarginResult(margin=torch.randn(500), gold_logprob=torch.randn(500),
                                     distractor_logprob=torch.randn(500), best_distractor=["x"] * 500),
        "AlphaSelection": AlphaSelection(k=20, alpha=0.5, target=None, baseline=0.25,
                                         rows=[{"k": k, "alpha": a, "accuracy": 0.5} for k in range(50) for a in range(6)]),
        "QKCache": cache_qk(tiny_llama, dx, [(0, 1), (1, 2)]),
        "DirectionExample": dx[0],
    }


NAMES = ["FocusLens", "DatasetScores (tiny model)", "DatasetScores (30x9, 21 scores)", "HeadScores",
         "HeadScores (30x9, 21 scores)", "FocusDirections (50 heads)", "FocusDirections (trained)", "Steer",
         "SplitSoftmax", "Pasta", "Ablate", "InjectVectors", "Compose", "HookHandle", "EvalResult",
         "LabelledPrompt (24 segments)", "RenderedExample", "TaskExample (20 long documents)", "Document", "ModelInfo",
         "TrainConfig", "Decoding", "LogitDiff", "MarginResult", "AlphaSelection", "QKCache", "DirectionExample"]


@pytest.mark.parametrize("name", NAMES)
def test_every_result_type_prints_a_short_summary(objects, name):
    text = repr(objects[name])
    assert len(text) <= LIMIT and text.count("\n") <= 1, f"repr({name}) is {len(text)} characters:\n{text[:600]}"
    assert "tensor(" not in text, f"repr({name}) prints a tensor: {text}"


def test_the_summaries_say_what_matters(objects):
    d = repr(objects["FocusDirections (50 heads)"])
    assert "SmolLM2-135M-Instruct" in d and "50 heads" in d and "hook_rot_q" in d and "α=1" in d and "norms" in d
    n = objects["FocusDirections (50 heads)"].norms()
    assert f"{float(n.min()):.3g}" in d and f"{float(n.max()):.3g}" in d
    ds = objects["DatasetScores (30x9, 21 scores)"]
    top = ds.ranking()[0]
    assert "30×9" in repr(ds) and f"L{top[0]}H{top[1]}" in repr(ds) and "n=1" in repr(ds)
    assert "20 docs, gold=7" in repr(objects["TaskExample (20 long documents)"])


def test_saved_directions_record_the_installed_versions(objects, tmp_path):
    d = objects["FocusDirections (trained)"]
    want = {"torch": version("torch"), "transformer_lens": version("transformer-lens"),
            "transformers": version("transformers"), "safetensors": version("safetensors")}
    assert {k: d.versions[k] for k in want} == want
    assert d.versions["focuslens"] == fl.__version__
    d.save(tmp_path / "fd")
    assert fl.FocusDirections.load(tmp_path / "fd").versions == d.versions
