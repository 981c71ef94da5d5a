"""focuslens.core.generation: one stop rule, one default budget, one decoding loop for every entry point."""

from __future__ import annotations

import inspect

import torch

import focuslens as fl
from focuslens.core.generation import DEFAULT_MAX_NEW_TOKENS, STOP_TOKENS, generate_response, greedy_generate, stop_ids


def test_stop_ids_are_eos_plus_the_known_end_of_turn_tokens(tok):
    ids = stop_ids(tok)
    vocab = tok.get_vocab()
    assert tok.eos_token_id in ids
    assert ids == {tok.eos_token_id} | {vocab[t] for t in STOP_TOKENS if t in vocab}
    assert vocab["<|im_end|>"] in ids and vocab["<|im_start|>"] not in ids


def test_every_entry_point_uses_the_one_default_budget():
    from focuslens.cli import build_parser
    from focuslens.demo import DemoConfig
    from focuslens.directions import make_direction_examples
    from focuslens.evaluation.runner import greedy_generate_batch
    from focuslens.score.contextual import score_dataset
    from focuslens.evaluation.sweeps import select_alpha

    from focuslens.evaluation.runner import Decoding

    assert Decoding().max_new_tokens == DEFAULT_MAX_NEW_TOKENS  # evaluate()'s decoding settings
    for fn in (score_dataset, make_direction_examples, select_alpha, greedy_generate,
               greedy_generate_batch, generate_response):
        assert inspect.signature(fn).parameters["max_new_tokens"].default == DEFAULT_MAX_NEW_TOKENS, fn.__qualname__
    assert DemoConfig().max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    for cmd in ("score", "sweep", "train", "evaluate"):
        args = build_parser().parse_args([cmd] + (["--heads", "x.json"] if cmd in ("sweep", "train") else [])
                                         + (["--output", "o"] if cmd in ("score", "train") else []))
        assert args.max_new_tokens == DEFAULT_MAX_NEW_TOKENS, cmd


def test_generate_response_is_greedy_generate_to_the_end_of_turn(tiny_llama):
    from focuslens.tasks import make_synthetic_qa, render

    r = render(make_synthetic_qa(1, n_docs=2)[0], tiny_llama.tokenizer)
    ids, _ = greedy_generate(tiny_llama, r.tokens, max_new_tokens=7, stop_at_newline=False)
    resp = generate_response(tiny_llama, r.tokens, max_new_tokens=7)
    assert resp.dtype == torch.long and resp.tolist() == ids
    assert not set(resp.tolist()) & stop_ids(tiny_llama.tokenizer)


def test_public_names():
    assert fl.core.DEFAULT_MAX_NEW_TOKENS == DEFAULT_MAX_NEW_TOKENS
    assert fl.core.generate_response is generate_response


def test_generate_responses_are_generate_response_one_by_one(tiny_llama, tiny_gpt2):
    """Batched responses (left-padded, prompts of different lengths) equal the one-by-one ones, in order."""
    from focuslens.core.generation import generate_responses
    from focuslens.tasks import make_synthetic_qa, render

    for model in (tiny_llama, tiny_gpt2):
        rs = [render(e, model.tokenizer) for e in make_synthetic_qa(5, n_docs=3, seed=1, doc_sentences=1)]
        assert len({len(r.tokens) for r in rs}) > 1  # left padding is exercised
        one = [generate_response(model, r.tokens, max_new_tokens=6).tolist() for r in rs]
        for bs in (1, 2, 8):
            got = generate_responses(model, [r.tokens for r in rs], max_new_tokens=6, batch_size=bs)
            assert [g.tolist() for g in got] == one, (type(model).__name__, bs)
            assert all(g.dtype == torch.long for g in got)
    labelled = generate_responses(tiny_llama, [r.tokens for r in rs[:3]], max_new_tokens=6, batch_size=2,
                                  progress="responses")  # the tqdm bar changes nothing else
    assert [g.tolist() for g in labelled] == [generate_response(tiny_llama, r.tokens, max_new_tokens=6).tolist()
                                              for r in rs[:3]]
    assert generate_responses(tiny_llama, [], batch_size=3, progress=True) == []


def test_generate_responses_rejects_a_bad_batch_size(tiny_llama):
    import pytest

    from focuslens.core.generation import generate_responses

    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        generate_responses(tiny_llama, [torch.tensor([1, 2, 3])], batch_size=0)


def test_bench_responses_smoke(tmp_path, load_script):
    """benchmarks/bench_responses.py runs on the tiny model: both prompt kinds, same responses at both sizes."""
    import json

    mod = load_script("benchmarks/bench_responses.py")
    out = mod.main(["--tiny", "--n", "3", "--batch", "2", "--threads", "1", "--output", str(tmp_path / "r.json")])
    assert [r["n"] for r in out["rows"]] == [3, 3]
    assert all(r["responses_differing"] == 0 and r["speedup"] > 0 for r in out["rows"])
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == out["rows"]
