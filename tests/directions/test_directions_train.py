"""Training focus directions: TrainConfig, the keyword forms, and content-keyed, pickle-free checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import warnings

import pytest
import torch

from focuslens.directions import (
    TrainConfig,
    make_direction_examples,
    train_focus_directions,
)
from focuslens.directions.checkpoint import CHECKPOINT_FORMAT_VERSION
from focuslens.testing import capital_example as _example

HEADS = [(1, 2), (0, 1)]


@pytest.fixture(scope="module")
def dx(tiny_llama):
    return make_direction_examples(tiny_llama, [_example(i) for i in range(8)],
                                   responses=[f"The capital is {chr(66 + i % 3)}." for i in range(8)])


@pytest.fixture(scope="module")
def tiny_llama_other():
    """Same architecture as tiny_llama, other weights."""
    from focuslens.testing import tiny_model

    return tiny_model("llama", seed=1)


def _live_kw(dx, tmp_path, **over):
    kw = {"heads": HEADS, "objective": "likelihood", "val_examples": dx[6:], "lr": 0.05, "max_norm": None,
          "progress": False, "checkpoint_dir": tmp_path / "ck", "seed": 3}
    kw.update(over)
    return kw


class _Planted:
    """A pickle whose loading would create a marker file (what an attacker could plant as state.pt)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(folder, marker):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.pt").write_bytes(pickle.dumps(_Planted(marker)))


@pytest.fixture
def no_torch_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.load must never be called on a checkpoint")

    monkeypatch.setattr(torch, "load", refuse)


# --------------------------------------------------------------------------------------------------
# TrainConfig


@pytest.mark.parametrize("field,value,msg", [
    ("objective", "kl", "objective must be"),
    ("method", "fast", "method must be"),
    ("lr", 0.0, "lr must be a finite number > 0"),
    ("lr", -1.0, "lr must be"),
    ("lr", "big", "lr must be"),
    ("steps", 0, "steps must be an integer >= 1"),
    ("epochs", 1.5, "epochs must be an integer"),
    ("epochs", True, "epochs must be an integer"),
    ("patience", 0, "patience must be"),
    ("eval_every", -2, "eval_every must be"),
    ("live_eval_every", 0, "live_eval_every must be"),
    ("max_norm", -1.0, "max_norm must be a number > 0, 'query'"),
    ("max_norm", "big", "max_norm must be"),
    ("alpha", math.nan, "alpha must be a finite number"),
    ("attention_weight", math.inf, "attention_weight must be"),
    ("init_std", -0.1, "init_std must be a finite number >= 0"),
    ("weight_decay", -0.01, "weight_decay must be"),
    ("seed", "zero", "seed must be an integer"),
    ("cache_precision", "fp8", "cache_precision must be 'model'"),
])
def test_config_validation(field, value, msg):
    with pytest.raises(ValueError, match=msg) as e:
        TrainConfig(**{field: value})
    assert repr(value) in str(e.value)  # says what was given


def test_config_resolved_defaults_and_dict():
    b = TrainConfig().resolved()
    assert (b.method, b.lr, b.steps, b.epochs, b.weight_decay, b.eval_every) == ("batched", 0.05, 300, None, 0.0, 10)
    assert b.attention_weight is None and b.live_eval_every is None
    p = TrainConfig(method="per_layer", patience=3, steps=7).resolved()
    assert (p.lr, p.epochs, p.weight_decay, p.steps, p.patience) == (1e-3, 10, 0.01, None, None)
    li = TrainConfig(objective="likelihood", method="per_layer", steps=999, attention_weight=3.0).resolved()
    assert (li.method, li.lr, li.epochs, li.weight_decay, li.steps, li.attention_weight) == (None, 1e-2, 5, 0.0, None, None)
    bo = TrainConfig(objective="both", attention_weight=3, lr=0.2, epochs=2).resolved()
    assert (bo.lr, bo.epochs, bo.attention_weight) == (0.2, 2, 3.0)
    assert bo.resolved() == bo  # idempotent
    d = bo.to_dict()
    assert list(d) == TrainConfig.field_names() and json.loads(json.dumps(d)) == d
    assert TrainConfig(max_norm=2).max_norm == 2.0 and isinstance(TrainConfig(lr=1).lr, float)  # normalised
    with pytest.raises(dataclasses.FrozenInstanceError):
        bo.lr = 1.0  # type: ignore[misc]


def test_unknown_override_and_bad_config_are_type_errors(tiny_llama, dx):
    with pytest.raises(TypeError, match="learning_rate") as e:
        train_focus_directions(tiny_llama, dx, heads=HEADS, learning_rate=0.1)
    for name in TrainConfig.field_names():
        assert name in str(e.value)
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        train_focus_directions(tiny_llama, dx, heads=HEADS, config={"lr": 0.1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr must be"):
        train_focus_directions(tiny_llama, dx, heads=HEADS, lr=-1.0)


def test_legacy_keyword_call_and_config_form_agree(tiny_llama, dx, tmp_path):
    """The historical 24-parameter call still works and equals the config form."""
    legacy = train_focus_directions(
        tiny_llama, dx[:4], heads=HEADS, objective="attention", method="batched", val_examples=dx[6:], alpha=1.0,
        lr=0.05, steps=20, epochs=None, init_std=0.01, max_norm="query", weight_decay=None, patience=None,
        eval_every=5, live_eval_every=None, attention_weight=1.0, seed=1, checkpoint_dir=tmp_path / "unused",
        progress=False, caches=None)
    cfg = TrainConfig(steps=20, eval_every=5, seed=1)
    new = train_focus_directions(tiny_llama, dx[:4], heads=HEADS, config=cfg, val_examples=dx[6:], progress=False)
    assert torch.equal(legacy.vectors, new.vectors)
    assert legacy.training["identity"] == new.training["identity"]
    # config + override: the override wins
    over = train_focus_directions(tiny_llama, dx[:4], heads=HEADS, config=cfg, steps=10, progress=False)
    assert over.training["steps"] == 10 and over.training["config"]["steps"] == 10
    assert not (tmp_path / "unused").exists()  # the attention objective writes no checkpoint


def test_summary_is_what_was_trained(tiny_llama, dx):
    d = train_focus_directions(tiny_llama, dx[:3], heads=HEADS, objective="likelihood", epochs=1, steps=999,
                               method="per_layer", attention_weight=5.0, max_norm=None, progress=False)
    t = d.training
    assert t["config"] == TrainConfig(objective="likelihood", epochs=1, max_norm=None).resolved().to_dict()
    assert t["lr"] == 1e-2 and t["epochs"] == 1 and t["method"] == "live"
    assert "steps" not in t and "attention_weight" not in t and t["config"]["steps"] is None
    assert "resumed_from_epoch" not in t and isinstance(t["identity"], str) and len(t["identity"]) == 16
    a = train_focus_directions(tiny_llama, dx[:3], heads=HEADS, method="per_layer", epochs=1, progress=False)
    assert a.training["lr"] == 1e-3 and a.training["weight_decay"] == 0.01 and a.training["method"] == "per_layer"
    assert "steps" not in a.training
    json.dumps(t)  # the summary is stored in config.json


# --------------------------------------------------------------------------------------------------
# Checkpoints: resume, refusal, safety


@pytest.mark.parametrize("objective", ["likelihood", "both"])
def test_resume_equals_uninterrupted_run(tiny_llama, dx, tmp_path, objective, no_torch_load):
    kw = _live_kw(dx, tmp_path, objective=objective)
    train = dx[:3]
    d1 = train_focus_directions(tiny_llama, train, epochs=1, **kw)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["checkpoint-e0001.safetensors", "checkpoint.json"]
    d2 = train_focus_directions(tiny_llama, train, epochs=2, **kw)
    fresh = train_focus_directions(tiny_llama, train, epochs=2, **{**kw, "checkpoint_dir": None})
    assert torch.equal(d2.vectors, fresh.vectors)  # bit-identical
    assert d2.training["history"] == fresh.training["history"]
    assert d2.training["resumed_from_epoch"] == 1 and "resumed_from_epoch" not in fresh.training
    assert d2.training["identity"] == fresh.training["identity"] == d1.training["identity"]
    assert d2.training["epochs"] == 2
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["checkpoint-e0002.safetensors", "checkpoint.json"]
    # a rerun of the finished run returns the same vectors without training
    d3 = train_focus_directions(tiny_llama, train, epochs=2, **kw)
    assert torch.equal(d3.vectors, fresh.vectors) and d3.training["resumed_from_epoch"] == 2
    # asking for fewer epochs than the checkpoint holds is refused
    with pytest.raises(ValueError, match="has 2 epochs, more than the 1 asked"):
        train_focus_directions(tiny_llama, train, epochs=1, **kw)


@pytest.mark.parametrize("change,msg", [
    ({"lr": 0.02}, "lr=0.05 there, 0.02 now"),
    ({"seed": 4}, "seed=3 there, 4 now"),
    ({"heads": [(1, 2), (0, 1), (1, 3)]}, "heads="),
    ({"objective": "both"}, "objective='likelihood' there, 'both' now"),
    ({"alpha": 0.5}, "alpha=1.0 there, 0.5 now"),
    ({"patience": 2}, "patience=None there, 2 now"),
    ({"train": slice(1, 4)}, "other training examples (same count, 3"),
    ({"train": slice(0, 4)}, "other training examples (3 there, 4 now)"),
    ({"val_examples": "short"}, "other validation examples (2 there, 1 now)"),
])
def test_changed_run_does_not_reuse_the_checkpoint(tiny_llama, dx, tmp_path, change, msg, no_torch_load):
    kw = _live_kw(dx, tmp_path)
    train_focus_directions(tiny_llama, dx[:3], epochs=1, **kw)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    change = dict(change)
    train = dx[change.pop("train")] if "train" in change else dx[:3]
    if change.get("val_examples") == "short":
        change["val_examples"] = dx[6:7]
    with pytest.raises(ValueError) as e:
        train_focus_directions(tiny_llama, train, epochs=2, **{**kw, **change})
    text = str(e.value)
    assert msg in text and "another checkpoint_dir" in text and "delete" in text
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before  # nothing overwritten


def test_other_model_weights_do_not_reuse_the_checkpoint(tiny_llama, tiny_llama_other, dx, tmp_path):
    kw = _live_kw(dx, tmp_path)
    train_focus_directions(tiny_llama, dx[:3], epochs=1, **kw)
    with pytest.raises(ValueError, match="other model weights"):
        train_focus_directions(tiny_llama_other, dx[:3], epochs=1, **kw)


def test_planted_pickle_is_never_loaded_api(tiny_llama, dx, tmp_path, no_torch_load):
    marker = tmp_path / "PWNED"
    _plant(tmp_path / "ck", marker)
    with pytest.warns(UserWarning, match="never loaded"):
        d = train_focus_directions(tiny_llama, dx[:3], epochs=1, **_live_kw(dx, tmp_path))
    assert not marker.exists()
    assert "resumed_from_epoch" not in d.training
    assert (tmp_path / "ck" / "checkpoint.json").exists()
    with pytest.warns(UserWarning, match="state.pt"):  # still ignored on the resume
        d2 = train_focus_directions(tiny_llama, dx[:3], epochs=2, **_live_kw(dx, tmp_path))
    assert d2.training["resumed_from_epoch"] == 1 and not marker.exists()


def test_planted_pickle_is_never_loaded_cli(tmp_path, no_torch_load):
    """`focuslens train --objective likelihood --output fd` checkpoints into fd.ckpt: a state.pt there never runs."""
    from focuslens.cli import main
    from focuslens.testing import tiny_hf_model, tiny_tokenizer

    model_dir = tmp_path / "model"
    tiny_hf_model("llama", seed=3).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    scores = tmp_path / "scores"
    assert main(["score", "--model", str(model_dir), "--n", "2", "--n-docs", "3", "--max-new-tokens", "4",
                 "--output", str(scores)]) == 0
    marker = tmp_path / "PWNED"
    _plant(tmp_path / "fd.ckpt", marker)
    with pytest.warns(UserWarning, match="never loaded"):
        code = main(["train", "--model", str(model_dir), "--n", "2", "--n-val", "1", "--n-docs", "3",
                     "--max-new-tokens", "4", "--heads", str(scores / "contextual_heads.json"), "--k", "2",
                     "--objective", "likelihood", "--output", str(tmp_path / "fd")])
    assert code == 0 and not marker.exists()
    assert (tmp_path / "fd" / "config.json").exists() and (tmp_path / "fd.ckpt" / "checkpoint.json").exists()


def test_corrupt_checkpoint_files_are_clear_errors(tiny_llama, dx, tmp_path, no_torch_load):
    kw = _live_kw(dx, tmp_path)
    train_focus_directions(tiny_llama, dx[:3], epochs=1, **kw)
    ck = tmp_path / "ck"
    js, st = ck / "checkpoint.json", ck / "checkpoint-e0001.safetensors"
    good_js, good_st = js.read_bytes(), st.read_bytes()

    st.write_bytes(good_st[: len(good_st) // 2])  # truncated tensors
    with pytest.raises(ValueError, match=r"checkpoint-e0001\.safetensors.*not a usable training checkpoint"):
        train_focus_directions(tiny_llama, dx[:3], epochs=2, **kw)
    st.write_bytes(good_st[:5])  # shorter than the safetensors header
    with pytest.raises(ValueError, match=r"checkpoint-e0001\.safetensors"):
        train_focus_directions(tiny_llama, dx[:3], epochs=2, **kw)
    st.unlink()
    with pytest.raises(ValueError, match="tensors file is missing"):
        train_focus_directions(tiny_llama, dx[:3], epochs=2, **kw)
    from safetensors.torch import save_file

    save_file({"u": torch.zeros(2, 16), "best_u": torch.zeros(2, 16)}, str(st))  # valid file, other content
    with pytest.raises(ValueError, match="do not match the checksums"):
        train_focus_directions(tiny_llama, dx[:3], epochs=2, **kw)
    st.write_bytes(good_st)

    js.write_bytes(good_js[: len(good_js) // 2])  # truncated JSON
    with pytest.raises(ValueError, match=r"checkpoint\.json: not valid JSON.*train afresh"):
        train_focus_directions(tiny_llama, dx[:3], epochs=2, **kw)
    js.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"checkpoint\.json.*not a focuslens training checkpoint"):
        train_focus_directions(tiny_llama, dx[:3], epochs=2, **kw)
    meta = json.loads(good_js)
    meta["tensors"] = "../elsewhere.safetensors"
    js.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="bad tensors file name"):
        train_focus_directions(tiny_llama, dx[:3], epochs=2, **kw)
    meta = json.loads(good_js)
    del meta["epoch"]
    js.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="missing or malformed field"):
        train_focus_directions(tiny_llama, dx[:3], epochs=2, **kw)
    js.write_bytes(good_js)
    d = train_focus_directions(tiny_llama, dx[:3], epochs=2, **kw)  # restored: resumes
    assert d.training["resumed_from_epoch"] == 1


def test_interrupted_write_keeps_the_previous_epoch(tiny_llama, dx, tmp_path):
    """checkpoint.json is the commit point: a stray tensors file of an unfinished epoch is ignored."""
    kw = _live_kw(dx, tmp_path)
    train_focus_directions(tiny_llama, dx[:3], epochs=1, **kw)
    stray = tmp_path / "ck" / "checkpoint-e0002.safetensors"
    stray.write_bytes(b"half a file")
    d = train_focus_directions(tiny_llama, dx[:3], epochs=2, **kw)
    fresh = train_focus_directions(tiny_llama, dx[:3], epochs=2, **{**kw, "checkpoint_dir": None})
    assert d.training["resumed_from_epoch"] == 1 and torch.equal(d.vectors, fresh.vectors)
    assert stray.read_bytes() != b"half a file"  # replaced by the real epoch-2 tensors


def test_checkpoint_is_json_and_safetensors_only(tiny_llama, dx, tmp_path):
    kw = _live_kw(dx, tmp_path)
    d = train_focus_directions(tiny_llama, dx[:3], epochs=1, **kw)
    meta = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())
    assert meta["identity"] == d.training["identity"] and meta["epoch"] == 1
    assert meta["identity_parts"]["config"]["lr"] == 0.05 and "epochs" not in meta["identity_parts"]["config"]
    assert meta["identity_parts"]["format_version"] == CHECKPOINT_FORMAT_VERSION
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "ck" / meta["tensors"]))
    assert set(t) == {"u", "best_u", "adam.step", "adam.exp_avg", "adam.exp_avg_sq"}
    assert torch.equal(t["best_u"], d.vectors)


# --------------------------------------------------------------------------------------------------
# Batched caching and the factorised optimiser: same numbers as the one-by-one / reference paths


def _mixed_lengths(model):
    from focuslens.testing import capital_example

    exs = [capital_example(i, n_docs=1 + i % 3) for i in range(7)]
    return make_direction_examples(model, exs, responses=[("The capital is B. " * (1 + i % 2)).strip()
                                                          for i in range(7)])


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2", "tiny_gemma3"])
def test_cache_qk_batched_equals_one_by_one(fixture, request):
    from focuslens.directions import cache_qk

    model = request.getfixturevalue(fixture)
    ex = _mixed_lengths(model)
    assert len({len(e.prompt) for e in ex}) >= 3  # the batches really are padded
    heads = [(1, 2), (0, 1), (1, 3)]
    one = cache_qk(model, ex, heads, batch_size=1)
    for bs in (3, 16):
        many = cache_qk(model, ex, heads, batch_size=bs)
        assert len(many) == len(one) and many.heads == one.heads and many.kv_pairs == one.kv_pairs
        for name in ("queries", "keys", "logits0"):
            for i, (a, b) in enumerate(zip(getattr(one, name), getattr(many, name))):
                assert a.shape == b.shape, (name, i)  # example order kept, nothing padded in the cache
                torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=f"{name}[{i}] batch_size={bs}")
        for name in ("visible", "relevant", "sink"):
            for a, b in zip(getattr(one, name), getattr(many, name)):
                assert torch.equal(a, b)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        cache_qk(model, ex, heads, batch_size=0)


def test_bfloat16_cache_is_close_keyed_and_leaves_the_model_float32(tiny_llama, dx):
    """cache_precision='bfloat16': autocast only inside the caching passes (q/k within bfloat16 rounding
    of the float32 cache, stored as float32), the model keeps its dtype, and the run's identity differs."""
    from focuslens.directions import cache_qk

    exact = cache_qk(tiny_llama, dx, HEADS)
    with warnings.catch_warnings():  # emulated on CPUs without AMX / AVX-512 BF16: a RuntimeWarning, tested in test_models
        warnings.simplefilter("ignore", RuntimeWarning)
        fast = cache_qk(tiny_llama, dx, HEADS, precision="bfloat16")
    assert next(tiny_llama.parameters()).dtype == torch.float32
    for a, b in zip(exact.queries + exact.keys, fast.queries + fast.keys):
        assert b.dtype == torch.float32 and a.shape == b.shape
        assert not torch.equal(a, b)  # really ran in bfloat16 ...
        torch.testing.assert_close(b, a, atol=0.05 * float(a.abs().max()), rtol=0.05)  # ... and only rounds
    with pytest.raises(ValueError, match="precision must be 'model' or 'bfloat16'"):
        cache_qk(tiny_llama, dx, HEADS, precision="half")
    kw = dict(heads=HEADS, objective="attention", steps=3, progress=False)
    d32 = train_focus_directions(tiny_llama, dx, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        d16 = train_focus_directions(tiny_llama, dx, cache_precision="bfloat16", **kw)
    assert d16.training["config"]["cache_precision"] == "bfloat16" and d32.training["config"]["cache_precision"] == "model"
    assert d16.training["identity"] != d32.training["identity"]


def test_factorised_mass_equals_reference(tiny_llama, dx):
    from focuslens.directions import cache_qk
    from focuslens.directions.objectives import _mass_from_batch, _pad_batch

    cache = cache_qk(tiny_llama, dx, HEADS)
    idx = list(range(len(dx)))
    g = torch.Generator().manual_seed(0)
    for std in (0.0, 0.5, 3.0):
        u = (torch.randn(len(HEADS), int(tiny_llama.cfg.d_head), generator=g) * std).requires_grad_(True)
        out = {}
        for fac in (True, False):
            batch = _pad_batch(cache, idx, "relevant", factorised=fac)
            assert (batch.E is not None) == fac
            m = _mass_from_batch(batch, u)
            (grad,) = torch.autograd.grad(m.sum(), u)
            out[fac] = (m.detach(), grad)
        torch.testing.assert_close(out[True][0], out[False][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out[True][1], out[False][1], atol=1e-5, rtol=1e-4)


def test_fast_paths_train_the_same_directions_with_the_same_identity(tiny_llama, dx):
    kw = {"heads": HEADS, "val_examples": dx[6:], "progress": False, "steps": 30, "patience": 2}
    ref = train_focus_directions(tiny_llama, dx[:6], cache_batch_size=1, _factorised=False, **kw)
    fast = train_focus_directions(tiny_llama, dx[:6], **kw)  # defaults: batched cache, factorised optimiser
    assert fast.training["identity"] == ref.training["identity"]  # same data, model, heads, config
    torch.testing.assert_close(fast.vectors, ref.vectors, atol=1e-4, rtol=1e-4)
    assert fast.training["heldout_relevant_attention_after"] == pytest.approx(
        ref.training["heldout_relevant_attention_after"], abs=1e-4)
    assert [h["step"] for h in fast.training["history"]] == [h["step"] for h in ref.training["history"]]
    assert fast.training["cache_seconds"] >= 0 and fast.training["cache_seconds"] <= fast.training["train_seconds"]
