"""nnsight backend: scores computed inside the trace equal the fused backend and HF eager attention.

nnsight is a dev dependency (``nnsight==0.8.1``); everything here runs offline on local models.
``remote=True`` (NDIF) needs an API key and the network and is not exercised by the tests.
"""

from __future__ import annotations


import pytest
import torch

from focuslens.backends.fused import load_fused
from focuslens.engine import FusedModel
from focuslens.score.contextual import HeadScores
from focuslens.testing import tiny_hf_model, tiny_tokenizer

nnsight_backend = pytest.importorskip("focuslens.backends.nnsight_backend")
pytest.importorskip("nnsight", reason="install the dev extra: pip install 'nnsight==0.8.1'")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _ids(n, seed=0, vocab=300):
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama_mha", "gemma3"])
def test_nnsight_matches_hf_eager_and_fused(arch):
    sc = nnsight_backend.NNsightScorer(tiny_hf_model(arch), tiny_tokenizer())
    ids = _ids(40, seed=1)
    spans = {"relevant": (5, 17), "sink": (0, 1)}
    got = sc.score_spans(ids, response=(30, 40), spans={"relevant": (5, 17)}, sink=(0, 1))
    assert isinstance(got, HeadScores) and got.method == "nnsight" and got.columns.shape == (2, 4, 40)
    eager = tiny_hf_model(arch)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        att = eager(ids[None], output_attentions=True).attentions
    fused = FusedModel(tiny_hf_model(arch)).score_spans(ids, response=(30, 40), spans={"relevant": (5, 17)})
    for k, (s, e) in spans.items():
        ref = torch.stack([a[0, :, 30:40, s:e].sum(-1).mean(-1) for a in att])
        assert got[k].shape == (2, 4) and got[k].dtype == torch.float32 and got[k].grad_fn is None
        torch.testing.assert_close(got[k], ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(got[k], fused[k], atol=1e-5, rtol=0)
    assert (got["relevant"] - got["sink"]).abs().max() > 1e-3


def test_nnsight_functional_form_and_errors():
    m = tiny_hf_model("llama")
    ids = _ids(20, seed=2)
    s = nnsight_backend.nnsight_contextual_scores(m, ids, relevant=(2, 8), response=(15, 20))
    ref = FusedModel(tiny_hf_model("llama")).contextual_scores(ids, relevant=(2, 8), response=(15, 20))
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=0)
    sc = nnsight_backend.NNsightScorer(m)
    with pytest.raises(ValueError, match="outside"):
        sc.contextual_scores(ids, relevant=(0, 30), response=(15, 20))
    with pytest.raises(ValueError, match="response starts"):
        sc.contextual_scores(ids, relevant=(10, 17), response=(15, 20))
    u = sc.score_spans(ids, response=(15, 20), spans={"u": [(1, 4), (3, 9)], "a": (1, 9)})
    torch.testing.assert_close(u["u"], u["a"], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="one sequence"):
        sc.contextual_scores(torch.stack([ids, ids]), relevant=(0, 3), response=(15, 20))
    with pytest.raises(TypeError):
        nnsight_backend.NNsightScorer(object())


@pytest.mark.slow
def test_nnsight_smollm_matches_default_path():
    """SmolLM2: nnsight scores equal the fused backend's (tested to 1e-4; observed ~1e-6)."""
    ids = _ids(80, seed=3, vocab=49152)
    sc = nnsight_backend.load_nnsight()
    assert (sc.n_layers, sc.n_heads, sc.n_kv_heads) == (30, 9, 3)
    got = sc.contextual_scores(ids, relevant=(10, 40), response=(64, 80))
    ref = load_fused().contextual_scores(ids, relevant=(10, 40), response=(64, 80))
    assert got.shape == (30, 9)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_missing_nnsight_gives_install_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nnsight", None)  # import nnsight -> ImportError
    with pytest.raises(ImportError, match="pip install 'nnsight==0.8.1'"):
        nnsight_backend.NNsightScorer(tiny_hf_model("llama"))


def test_nnsight_same_protocol_as_scoring(tiny_llama):
    """score_spans: the HeadScores of focuslens.score_spans (names, distractor aggregates, columns)."""
    import focuslens as fl

    sc = nnsight_backend.NNsightScorer(tiny_hf_model("llama"), tiny_tokenizer())
    ids = _ids(44, seed=4)
    kw = dict(response=(36, 44), spans={"relevant": (5, 12)}, distractors=[(12, 20), (20, 30)])
    got = sc.score_spans(ids, **kw)
    ref = fl.score.score_spans(tiny_llama, ids, **kw)
    assert set(got.names) == set(ref.names)
    for name in ref.names:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.columns, ref.columns, atol=1e-5, rtol=0)
    small = sc.score_spans(ids, keep_columns=False, **kw)
    assert small.columns.shape == (2, 4, 0)
    torch.testing.assert_close(small.distractors_max, ref.distractors_max, atol=1e-5, rtol=0)
