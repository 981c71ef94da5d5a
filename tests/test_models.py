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
