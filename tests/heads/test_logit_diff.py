"""logit_diff_metric: the one logit-difference metric for patching and attribution on one's own prompt."""

from __future__ import annotations

import pytest
import torch

from focuslens.heads.attribution import attribution_patch_heads
from focuslens.heads.patching import LogitDiff, logit_diff_metric, patch_heads

CLEAN = torch.tensor([[0, 5, 17, 33, 8, 91, 120, 44, 7, 60, 250, 13]])
CORRUPT = torch.tensor([[0, 5, 17, 33, 8, 200, 121, 44, 7, 60, 250, 13]])


def _ids(model, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def _one_and_multi(model) -> tuple[str, str, str]:
    """Two single-token words and one multi-token word of the model's own tokenizer (found, not assumed)."""
    words = [" the", " of", " and", " to", " in", " is", " a", " it"]
    single = [w for w in words if len(_ids(model, w)) == 1]
    multi = next(w for w in (" Zorvathquill", " Xylqwertbrand", " Qqzzxxvvkk") if len(_ids(model, w)) > 1)
    assert len(single) >= 2, "the test needs two one-token words in the tiny tokenizer"
    return single[0], single[1], multi


def test_strings_equal_hand_written_metric(tiny_llama):
    good, bad, _ = _one_and_multi(tiny_llama)
    g, b = _ids(tiny_llama, good)[0], _ids(tiny_llama, bad)[0]
    m = logit_diff_metric(tiny_llama, good, bad)
    assert isinstance(m, LogitDiff) and (m.good, m.bad) == (g, b)
    logits = tiny_llama(torch.cat([CLEAN, CORRUPT]))
    assert torch.allclose(m(logits), (logits[:, -1, g] - logits[:, -1, b]).mean())
    at3 = logit_diff_metric(tiny_llama, g, b, pos=3)
    assert torch.allclose(at3(logits), (logits[:, 3, g] - logits[:, 3, b]).mean())
    assert "first token" not in repr(m) and repr(good) in repr(m)


def test_multi_token_answer_first_or_refused(tiny_llama):
    good, _, multi = _one_and_multi(tiny_llama)
    ids = _ids(tiny_llama, multi)
    m = logit_diff_metric(tiny_llama, multi, good)  # default: the first token, and the repr says so
    assert m.good == ids[0]
    assert f"first token of {multi!r}" in repr(m)
    with pytest.raises(ValueError, match=rf"{len(ids)} tokens.*multi_token='first'"):
        logit_diff_metric(tiny_llama, multi, good, multi_token="error")
    with pytest.raises(ValueError, match="multi_token must be"):
        logit_diff_metric(tiny_llama, good, multi, multi_token="all")  # type: ignore[arg-type]


def test_refuses_what_cannot_be_a_logit_difference(tiny_llama):
    good, _, _ = _one_and_multi(tiny_llama)
    with pytest.raises(ValueError, match="same token"):
        logit_diff_metric(tiny_llama, good, good + good)
    with pytest.raises(ValueError, match="tokenises to nothing"):
        logit_diff_metric(tiny_llama, "", good)
    with pytest.raises(TypeError, match="token id"):
        logit_diff_metric(tiny_llama, True, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        logit_diff_metric(tiny_llama, -1, 3)
    with pytest.raises(ValueError, match="outside this model's vocabulary"):  # refused when built
        logit_diff_metric(tiny_llama, 10**7, 3)
    huge = LogitDiff(good=10**7, bad=3)  # built by hand: refused when applied to the logits
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        huge(tiny_llama(CLEAN))


def test_patching_and_attribution_take_it(tiny_llama):
    """The helper is the metric form both routes expect: patching recovers the clean value on the
    identity, attribution's estimate is a finite [layer, head] table."""
    m = logit_diff_metric(tiny_llama, 3, 9)
    clean_value = float(m(tiny_llama(CLEAN)))
    same = patch_heads(tiny_llama, CLEAN, CLEAN, m)
    assert torch.allclose(same, torch.full_like(same, clean_value))
    est = attribution_patch_heads(tiny_llama, CORRUPT, CLEAN, m)
    exact = patch_heads(tiny_llama, CORRUPT, CLEAN, m)
    assert est.shape == exact.shape and torch.isfinite(est).all()
    assert not torch.allclose(exact, torch.full_like(exact, float(m(tiny_llama(CORRUPT)))))
