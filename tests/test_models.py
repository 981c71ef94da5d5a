import time

import pytest
import torch

import focuslens as fl
from focuslens.models import HookedModel


def test_default_model_loads_offline_with_expected_shape(smollm):
    assert (smollm.cfg.n_layers, smollm.cfg.n_heads) == (30, 9)
    info = fl.model_info(smollm)
    assert info.n_kv_heads == 3 and info.d_head == 64 and info.rotary and info.group_size == 3
    assert info.name == "SmolLM2-135M-Instruct"
    assert isinstance(smollm, HookedModel)
    assert fl.models.default_model_dir().joinpath("model.safetensors").exists()


def test_cached_default_loads_fast(smollm):
    t = time.perf_counter()
    m = fl.load_model(verbose=False)
    # generous bound: the bar is < 5 s for the whole import+load; this is a sanity check only
    assert time.perf_counter() - t < 30
    assert m.cfg.n_layers == 30


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_tiny_models_match_hf_logits(arch, tok):
    from focuslens.testing import tiny_hf_model

    hf = tiny_hf_model(arch, seed=1)
    ids = torch.tensor([tok("The capital of Marn is Pell.").input_ids])
    with torch.no_grad():
        ref = hf(ids).logits
    model = fl.load_model(hf, tokenizer=tok)
    with torch.no_grad():
        out = model(ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_local_checkpoint_folder(tmp_path, tok):
    from focuslens.testing import tiny_hf_model

    hf = tiny_hf_model("llama", seed=2)
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m = fl.load_model(tmp_path)
    assert m.cfg.n_layers == 2 and fl.model_info(m).n_kv_heads == 2


def test_hub_name_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(RuntimeError, match="offline"):
        fl.load_model("some-org/some-model-that-is-not-cached")
    assert time.perf_counter() - t < 5


def test_bad_inputs(tmp_path, tiny_llama):
    with pytest.raises(FileNotFoundError, match="config.json"):
        fl.load_model(tmp_path)
    with pytest.raises(FileNotFoundError):
        fl.load_model("./no/such/folder")
    with pytest.raises(TypeError):
        fl.load_model(42)
    from focuslens.testing import tiny_hf_model

    with pytest.raises(ValueError, match="tokenizer"):
        fl.load_model(tiny_hf_model("llama"))
    assert fl.load_model(tiny_llama) is tiny_llama


def test_check_heads(tiny_llama):
    assert fl.check_heads(tiny_llama, [(0, 1), [1, 3]]) == [(0, 1), (1, 3)]
    with pytest.raises(ValueError, match="Unknown head"):
        fl.check_heads(tiny_llama, [(2, 0)])
    with pytest.raises(ValueError, match="Unknown head"):
        fl.check_heads(tiny_llama, [(0, 4)])
    with pytest.raises(ValueError, match="twice"):
        fl.check_heads(tiny_llama, [(0, 1), (0, 1)])


@pytest.mark.parametrize("fixture", ["tiny_llama", "smollm"])
def test_greedy_generation_same_with_and_without_kv_cache(fixture, request, tok):
    """Guards the transformers pin: 5.24 silently breaks cached generation in TL 4.3."""
    model = request.getfixturevalue(fixture)
    p = fl.build_prompt(
        model.tokenizer,
        ["Answer the question.\n", ("doc", "The capital of Veloria is Quentor."), "\nWhat is the capital of Veloria?"],
        chat=True,
    )
    toks = p.tokens[None]
    a = model.generate(toks, max_new_tokens=12, do_sample=False, verbose=False, use_past_kv_cache=True)
    b = model.generate(toks, max_new_tokens=12, do_sample=False, verbose=False, use_past_kv_cache=False)
    assert torch.equal(a, b)
    assert a.shape[1] > toks.shape[1]


def test_hook_handle_is_leak_free(tiny_llama, tok):
    ids = torch.tensor([tok("The capital of Marn is Pell.").input_ids])
    base = tiny_llama(ids)
    calls = []

    def fn(x, hook):
        calls.append(hook.name)
        return x * 0.5

    with fl.attach_hooks(tiny_llama, [("blocks.0.attn.hook_z", fn)]) as h:
        assert fl.count_hooks(tiny_llama) == 1 and h.active
        changed = tiny_llama(ids)
    assert not torch.equal(changed, base) and calls
    assert fl.count_hooks(tiny_llama) == 0
    assert torch.equal(tiny_llama(ids), base)
    with pytest.raises(ValueError, match="no hook point"):
        fl.attach_hooks(tiny_llama, [("blocks.0.attn.hook_z", fn), ("blocks.9.attn.hook_z", fn)])
    assert fl.count_hooks(tiny_llama) == 0

    def boom(x, hook):
        raise RuntimeError("inside hook")

    with pytest.raises(RuntimeError, match="inside hook"):
        with fl.attach_hooks(tiny_llama, [("blocks.1.attn.hook_pattern", boom)]):
            tiny_llama(ids)
    assert fl.count_hooks(tiny_llama) == 0
    assert torch.equal(tiny_llama(ids), base)


# --------------------------------------------------------------------------------------------------
# run_until: the partial forward


def _qk_names(model, layer):
    from focuslens.attention import layer_attention

    la = layer_attention(model, layer)
    return [la.q_hook, la.k_hook]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_run_until_equals_full_forward_and_stops(fixture, request, tok):
    from focuslens.models import run_until
    from focuslens.testing import grab_hooks

    model = request.getfixturevalue(fixture)
    ids = torch.tensor([tok("The capital of Marn is Pell. The capital of Quo is Vey.").input_ids])
    names = _qk_names(model, 0) + ["blocks.0.hook_resid_post"]
    full = grab_hooks(model, ids, names)
    later = []  # a hook on the last layer: must never run when only layer 0 is needed

    def spy(x, hook):
        later.append(hook.name)
        return x

    with fl.attach_hooks(model, [("blocks.1.hook_resid_pre", spy), (_qk_names(model, 1)[0], spy)]):
        got = run_until(model, ids, names=names)
        assert fl.count_hooks(model) == 2  # only the spies: run_until left none of its own
    assert later == []
    assert sorted(got) == sorted(names)
    for n in names:
        assert got[n].shape[0] == 1 and not got[n].requires_grad
        assert torch.equal(got[n][0], full[n]), n  # same computation, bit-identical
    # the extra hooks= form: the function runs (and may modify), the pass still stops after it
    seen = []
    out = run_until(model, ids, hooks=[(names[0], lambda x, hook: seen.append(x.shape) or x)])
    assert out == {} and len(seen) == 1 and later == []
    assert fl.count_hooks(model) == 0


def test_run_until_right_padded_batch_equals_single(tiny_llama, tok):
    from focuslens.models import run_until

    seqs = [tok(t).input_ids for t in ("The capital of Marn is Pell.", "Quo is a city. The capital of Vey is Zor.")]
    P = max(map(len, seqs))
    toks = torch.full((2, P), tok.pad_token_id or 0)
    mask = torch.zeros(2, P, dtype=torch.long)
    for b, s in enumerate(seqs):
        toks[b, :len(s)] = torch.tensor(s)
        mask[b, :len(s)] = 1
    names = _qk_names(tiny_llama, 1)
    batched = run_until(tiny_llama, toks, names=names, attention_mask=mask)
    for b, s in enumerate(seqs):
        single = run_until(tiny_llama, torch.tensor(s), names=names)  # [pos] is accepted too
        for n in names:
            torch.testing.assert_close(batched[n][b, :len(s)], single[n][0], atol=1e-6, rtol=1e-6)
    assert fl.count_hooks(tiny_llama) == 0


def test_run_until_error_paths_leave_no_hooks(tiny_llama, tok):
    from focuslens.models import run_until

    ids = torch.tensor([tok("The capital of Marn is Pell.").input_ids])
    base = tiny_llama(ids)

    def boom(x, hook):
        raise KeyError("inside hook")

    with pytest.raises(KeyError, match="inside hook"):
        run_until(tiny_llama, ids, names=_qk_names(tiny_llama, 1), hooks=[(_qk_names(tiny_llama, 0)[0], boom)])
    assert fl.count_hooks(tiny_llama) == 0
    with pytest.raises(ValueError, match="Unknown hook name.*blocks.7.attn.hook_q"):
        run_until(tiny_llama, ids, names=["blocks.7.attn.hook_q"])
    with pytest.raises(ValueError, match="at least one hook name"):
        run_until(tiny_llama, ids)
    assert fl.count_hooks(tiny_llama) == 0
    assert torch.equal(tiny_llama(ids), base)  # the model is untouched


def test_run_until_reports_hooks_that_never_fired(tiny_llama, tok):
    from focuslens.models import run_until

    class Skipping:  # a backend whose forward never reaches one of the hook points
        def __init__(self, model):
            self.model, self.hook_dict, self.cfg = model, model.hook_dict, model.cfg
            self._forward_pre_hooks = {}

        def __call__(self, tokens, **kw):
            return self.model(tokens, stop_at_layer=1)

    ids = torch.tensor([tok("The capital of Marn is Pell.").input_ids])
    with pytest.raises(RuntimeError, match=r"ended before hook\(s\).*blocks.1"):
        run_until(Skipping(tiny_llama), ids, names=_qk_names(tiny_llama, 0) + _qk_names(tiny_llama, 1))
    assert fl.count_hooks(tiny_llama) == 0
