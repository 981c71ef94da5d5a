"""Hostile input: untrusted files, bad arguments, interrupted and concurrent runs (issue #14).

Each test pins the exact behaviour (docs/guarantees.md lists the guarantees these tests back):

* the CLI checks every argument before any model work and answers every expected failure with exit 2
  and ONE line on stderr that names the problem and the fix, never a traceback; an unexpected error
  is one line naming the file that holds the traceback (``--debug`` prints it);
* no file the library reads is ever unpickled (a planted pickle that would create a marker file is
  put at every path the library could read, and the marker never appears);
* a refused or failed call leaves zero hooks on the model and the previous artefact or record file
  intact and loadable;
* prompts are checked against the model's context, rankings against the model, payloads against
  their checksum.

Tiny models and the CLI's ``main([...])`` in-process; a few subprocesses for real exit codes, kills
and a second process.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import focuslens.cli as cli
from focuslens.core.errors import OutputBusy, UsageError
from focuslens.core.hooks import count_hooks
from focuslens.core.io import lock_path, output_lock
from focuslens.core.models import check_context, model_info
from focuslens.core.checks import check_heads

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------------------------------


class _Planted:
    """Unpickling this creates ``path``: the proof that a pickle was executed."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(_Planted(marker)))


def _cli(argv, capsys) -> tuple[int, list[str]]:
    """Run the CLI in-process; return (exit code, stderr lines) and check the one-line contract."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "Traceback" not in "\n".join(err), err
    return code, err


def _usage(argv, capsys, *needles: str) -> str:
    """Exit 2, exactly one stderr line, containing every needle (the problem and the fix)."""
    code, err = _cli(argv, capsys)
    assert code == 2, (argv, err)
    assert len(err) == 1, err
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from focuslens.testing import tiny_hf_model, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny_llama_ckpt")
    tiny_hf_model("llama", seed=3).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test (as an internal error, exit 1): proves a check ran before."""
    def boom(args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_model", boom)


def _fd(model, heads=((0, 0), (1, 2)), seed=0):
    from focuslens.directions import FocusDirections

    g = torch.Generator().manual_seed(seed)
    info = model_info(model)
    return FocusDirections(heads=list(heads), vectors=torch.randn(len(heads), info.d_head, generator=g),
                           fingerprint=info.fingerprint(), model_name=info.name, site="hook_rot_q")


def _ranking(path: Path, model, heads=((1, 2), (0, 0), (0, 1))) -> Path:
    from focuslens.score.ranking import RANKING_FORMAT

    info = model_info(model)
    path.write_text(json.dumps({"format": RANKING_FORMAT, "model": info.name, "fingerprint": info.fingerprint(),
                                "ranking": [[l, h, 0.5, 0.1] for l, h in heads]}))
    return path


def _hold_lock(path: Path, pid: str = "4242"):
    """Hold ``output_lock(path)`` as another process would (flock on its own open file description)."""
    import fcntl

    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock, "w")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write(pid + "\n")
    f.flush()
    return f


def _litm_file(path: Path, n: int = 3) -> Path:
    from focuslens.tasks.litm import save_litm
    from focuslens.testing import capital_example

    return save_litm([capital_example(i) for i in range(n)], path)


# --------------------------------------------------------------------------------------------------
# 1. No pickle is ever loaded
# --------------------------------------------------------------------------------------------------


_CODE_PATTERN = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\(|import pickle|torch\.load\(|(?<![.\w])eval\(|"
                           r"exec\(|allow_pickle\s*=\s*True|yaml\.load\(|marshal\.loads?\(|import shelve|dill\.")


def test_source_never_unpickles_or_evaluates():
    """grep focuslens/: only ``.eval()`` method calls and ``torch.load(..., weights_only=True)`` are allowed."""
    hits = []
    for f in sorted((ROOT / "focuslens").rglob("*.py")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for m in _CODE_PATTERN.finditer(code):
                if m.group(0) == "torch.load(" and "weights_only=True" in code:
                    continue
                if "``" in code:  # prose in a docstring (``torch.load(weights_only=True)``)
                    continue
                hits.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert hits == []
    assert _CODE_PATTERN.search("x = torch.load(p)") and _CODE_PATTERN.search("eval(s)")  # the pattern bites
    assert not _CODE_PATTERN.search("model.eval()")


def test_planted_pickles_are_never_executed(tiny_llama, tmp_path):
    """A pickle at every path the library could read: checkpoint state.pt, *.pt in an artefact folder,
    the authors' .pth import (read weights_only=True: refused), a ranking and a data file."""
    from focuslens.directions import FocusDirections
    from focuslens.directions.checkpoint import LEGACY_CHECKPOINT
    from focuslens.score.ranking import load_heads
    from focuslens.tasks.litm import load_litm

    marker = tmp_path / "PWNED"
    d = _fd(tiny_llama)
    d.save(tmp_path / "fd")
    for name in ("directions.pt", "state.pt", "vectors.pth", "directions.bin"):
        _plant(tmp_path / "fd" / name, marker)
    assert torch.equal(FocusDirections.load(tmp_path / "fd", model=tiny_llama).vectors, d.vectors)
    _plant(tmp_path / "authors" / "head_q_directions_0.pth", marker)
    with pytest.raises(Exception):
        FocusDirections.from_authors(tmp_path / "authors", tiny_llama)
    _plant(tmp_path / "ranking.json", marker)
    with pytest.raises(UsageError, match="ranking.json: not a text file|ranking.json: not valid JSON"):
        load_heads(tmp_path / "ranking.json")
    _plant(tmp_path / "data.jsonl", marker)
    with pytest.raises(UsageError, match="data.jsonl"):
        load_litm(tmp_path / "data.jsonl")
    assert LEGACY_CHECKPOINT == "state.pt"  # the training-checkpoint case: tests/test_directions_train.py
    assert not marker.exists()
    assert count_hooks(tiny_llama) == 0


def test_planted_pickle_model_weights_are_never_executed(tiny_folder, tmp_path, capsys):
    """A model folder whose only weights are a pickled pytorch_model.bin: exit 2, nothing executed."""
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_folder.iterdir():
        if not f.name.endswith(".safetensors") and "index" not in f.name:
            (model / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "PWNED"
    _plant(model / "pytorch_model.bin", marker)
    _usage(["info", "--model", model], capsys, "--model", "cannot load this model")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# 2. compose() and hooks
# --------------------------------------------------------------------------------------------------


def test_compose_refusal_removes_every_handle(tiny_llama, tiny_gpt2):
    from focuslens.intervene.eager import compose, inject_vectors

    u = torch.ones(model_info(tiny_llama).d_head)
    h1 = inject_vectors(tiny_llama, {(0, 0): u})
    h2 = inject_vectors(tiny_gpt2, {(0, 0): torch.ones(model_info(tiny_gpt2).d_head)})
    with pytest.raises(ValueError, match="same model.*removed"):
        compose(h1, h2)
    assert count_hooks(tiny_llama) == 0 and count_hooks(tiny_gpt2) == 0
    h3 = inject_vectors(tiny_llama, {(0, 0): u})
    with pytest.raises(TypeError, match="HookHandle.*removed"):
        compose(h3, "not a handle")
    assert count_hooks(tiny_llama) == 0


# --------------------------------------------------------------------------------------------------
# 3. Rankings belong to a model
# --------------------------------------------------------------------------------------------------


def test_ranking_of_another_model_is_refused(tiny_llama, tiny_gpt2, tmp_path):
    from focuslens.score.ranking import load_heads

    r = _ranking(tmp_path / "r.json", tiny_gpt2)
    with pytest.raises(UsageError, match=r"ranks the heads of another model .*focuslens score"):
        load_heads(r, model=tiny_llama)
    assert load_heads(r, model=tiny_gpt2, k=2) == [(1, 2), (0, 0)]


def test_ranking_of_another_model_is_refused_by_the_cli(tiny_folder, tiny_gpt2, tmp_path, capsys):
    r = _ranking(tmp_path / "r.json", tiny_gpt2)
    _usage(["evaluate", "--model", tiny_folder, "--n", 1, "--n-docs", 2, "--heads", r, "--k", 2, "--tau", 0.5,
            "--output", tmp_path / "ev"], capsys, "another model", "focuslens score")
    assert not (tmp_path / "ev").exists()  # refused before the output was made


@pytest.mark.parametrize("content, needle", [
    ('{"format": "focuslens.contextual_heads/v1", "fingerprint": null, "ranking": [[0, 0, 1.0, 0.0]]}',
     "'fingerprint' must be"),
    ('{"format": "focuslens.contextual_heads/v1", "ranking": [[0, 0, 1.0, 0.0]]}', "'fingerprint' must be"),
    ('[[0, 0], [0.0, 1.5]]', "pair of ints"),
    ('[[0, 0], [true, 1]]', "pair of ints"),
    ('{"heads": [[0, 0]]}', "expected [[layer, head], ...]"),
    ('[[0, 0], ', "not valid JSON"),
    ('[]', "lists no heads"),
    ('"0,0"', "expected [[layer, head], ...]"),
])
def test_malformed_ranking_files_name_the_file(tmp_path, content, needle):
    from focuslens.score.ranking import load_heads

    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(UsageError) as e:
        load_heads(p)
    assert needle in str(e.value) and "bad.json" in str(e.value)


def test_plot_of_a_malformed_ranking_is_one_line(tmp_path, capsys, no_model):
    p = tmp_path / "r.json"
    p.write_text('{"format": "focuslens.contextual_heads/v1", "ranking": []}')
    _usage(["plot", p, "--output", tmp_path / "fig"], capsys, "r.json", "malformed ranking", "focuslens score")
    p.write_text("{oops")
    _usage(["plot", p, "--output", tmp_path / "fig"], capsys, "r.json", "not valid JSON")


# --------------------------------------------------------------------------------------------------
# 4. Context length
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_context_length_is_checked_before_the_model_runs(arch, request):
    """Rotary models ran past n_ctx silently, learned-position ones raised a bare IndexError."""
    from focuslens.score.contextual import contextual_scores, score_spans

    model = request.getfixturevalue(arch)
    n_ctx = model_info(model).n_ctx
    long = torch.randint(1, 300, (n_ctx + 5,))
    with pytest.raises(UsageError, match=rf"has {n_ctx + 5} tokens but the context of tiny-\w+ is {n_ctx} tokens; shorten"):
        contextual_scores(model, long, relevant=(1, 3), response=(n_ctx, n_ctx + 5))
    with pytest.raises(UsageError, match=f"{n_ctx + 5} tokens"):
        score_spans(model, long, response=(n_ctx, n_ctx + 5))
    assert count_hooks(model) == 0
    check_context(model, n_ctx, what="exactly the context")  # the limit itself is fine
    with pytest.raises(UsageError, match="my prompt has 513"):
        check_context(model, n_ctx + 1, what="my prompt")


def test_score_dataset_checks_prompt_plus_budget(tiny_llama):
    from focuslens.score.contextual import score_dataset
    from focuslens.tasks import render
    from focuslens.testing import capital_example

    ex = [render(capital_example(0), tiny_llama.tokenizer)]
    with pytest.raises(UsageError, match=r"example 0 \(prompt \d+ tokens \+ max_new_tokens 600\).*context"):
        score_dataset(tiny_llama, ex, max_new_tokens=600, progress=False)
    assert count_hooks(tiny_llama) == 0


def test_cli_checks_the_context_before_generating(tiny_folder, tmp_path, capsys):
    _usage(["score", "--model", tiny_folder, "--n", 1, "--n-docs", 2, "--max-new-tokens", 600,
            "--output", tmp_path / "s"], capsys, "--max-new-tokens 600", "context", "512 tokens", "shorten")
    assert not (tmp_path / "s" / "contextual_heads.json").exists()


def test_meta_tokens_are_refused(tiny_llama):
    from focuslens.score.contextual import contextual_scores

    t = torch.tensor([0, 5, 6, 7, 8, 9])
    with pytest.raises(UsageError, match="'meta' device.*move it to a real device"):
        contextual_scores(tiny_llama, t.to("meta"), relevant=(1, 3), response=(4, 6))
    with pytest.raises(UsageError, match="meta"):
        check_context(tiny_llama, t.to("meta"), what="tokens")
    assert count_hooks(tiny_llama) == 0


# --------------------------------------------------------------------------------------------------
# 5. CLI arguments are validated before any model work
# --------------------------------------------------------------------------------------------------


def _sweep(tmp_path, *extra):
    return ["sweep", "--heads", tmp_path / "r.json", "--n", 2, "--output", tmp_path / "out", *extra]


@pytest.mark.parametrize("extra, needles", [
    (["--offset", "-1"], ["--offset must be >= 0"]),
    (["--ks", "-2"], ["--ks must be positive integers"]),
    (["--ks", "0,5"], ["--ks must be positive integers"]),
    (["--ks", ""], ["--ks must be positive integers"]),
    (["--random-seeds", ""], ["--random-seeds needs at least one seed"]),
    (["--taus", "inf"], ["tau must be > 0 and finite"]),
    (["--taus", "nan"], ["tau must be > 0 and finite"]),
    (["--taus", "0"], ["tau must be > 0"]),
    (["--taus", ""], ["--taus needs at least one value"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens must be >= 1"]),
    (["--n-docs", "0"], ["--n-docs must be >= 1"]),
    (["--threads", "0"], ["--threads must be >= 1"]),
    (["--ks", "x"], ["argument --ks", "expected comma-separated integers", "--help"]),
    (["--device", "nonsense"], ["--device", "not a torch device"]),
])
def test_sweep_arguments_fail_fast(tmp_path, capsys, no_model, extra, needles):
    (tmp_path / "r.json").write_text("[[0, 0], [1, 1]]")
    _usage(_sweep(tmp_path, *extra), capsys, *needles)
    assert not (tmp_path / "out").exists()


def test_sweep_k_larger_than_the_ranking_fails_fast(tmp_path, capsys, no_model):
    (tmp_path / "r.json").write_text("[[0, 0], [1, 1]]")
    _usage(_sweep(tmp_path, "--ks", "1,3"), capsys, "k=3 exceeds the 2 heads")


def _train(tmp_path, *extra):
    (tmp_path / "r.json").write_text("[[0, 0], [1, 1], [0, 1]]")
    return ["train", "--heads", tmp_path / "r.json", "--n", 2, "--k", 3, "--output", tmp_path / "fd", *extra]


@pytest.mark.parametrize("extra, needles", [
    (["--n-val", "0"], ["--n-val (validation examples) must be >= 1"]),
    (["--n", "0"], ["--n must be positive"]),
    (["--k", "0"], ["--k must be >= 1"]),
    (["--k", "4"], ["k=4", "lists 3 heads"]),
    (["--select-alphas", "nan"], ["--select-alphas must be finite"]),
    (["--select-alphas", "0"], ["--select-alphas must be non-zero"]),
    (["--select-alphas", "-1"], ["at least one > 0"]),
    (["--select-alphas", "1", "--select-ks", "0"], ["--select-ks must be in 1..--k (3)"]),
    (["--select-alphas", "1", "--select-ks", "4"], ["--select-ks must be in 1..--k (3)"]),
    (["--select-alphas", "1", "--select-targets", "1.5"], ["--select-targets are fractions", "(0, 1)"]),
    (["--select-ks", "2"], ["need --select-alphas"]),
])
def test_train_arguments_fail_fast(tmp_path, capsys, no_model, extra, needles):
    _usage(_train(tmp_path, *extra), capsys, *needles)
    assert not (tmp_path / "fd").exists()


def test_train_refuses_to_replace_a_folder_that_is_not_an_artefact(tiny_folder, tmp_path, capsys):
    keep = tmp_path / "fd" / "thesis.tex"
    keep.parent.mkdir()
    keep.write_text("precious")
    _usage(_train(tmp_path, "--model", tiny_folder, "--n-docs", 2), capsys,
           "not a focus-directions artefact", "choose another path")
    assert keep.read_text() == "precious"


def _evaluate(tmp_path, *extra):
    return ["evaluate", "--n", 1, "--output", tmp_path / "ev", *extra]


@pytest.mark.parametrize("extra, needles", [
    (["--variant", "negative", "--heads", "{r}", "--tau", "0.5"], ["--variant negative removes the gold document",
                                                                  "use --variant original"]),
    (["--heads", "{r}"], ["--tau must be given and > 0"]),
    (["--heads", "{r}", "--tau", "inf"], ["--tau must be given and > 0"]),
    (["--tau", "0.5"], ["--tau needs --heads"]),
    (["--alpha", "1"], ["--alpha needs --directions"]),
    (["--directions", "{d}", "--alpha", "strong"], ["--alpha must be a number or 'auto'"]),
    (["--directions", "{d}", "--alpha", "nan"], ["--alpha must be finite"]),
    (["--directions", "{d}", "--heads", "{r}", "--tau", "0.5"], ["either --directions or --heads"]),
    (["--directions", "{missing}"], ["no such folder", "focuslens train"]),
    (["--directions", "{r}"], ["is a file", "focuslens train"]),
    (["--heads", "{missing}", "--tau", "0.5"], ["--heads", "no such file"]),
    (["--heads", "{folder}", "--tau", "0.5"], ["--heads", "is a folder"]),
    (["--data", "{folder}"], ["--data", "is a folder"]),
    (["--data", "{missing}"], ["--data", "no such file", "synthetic"]),
    (["--output", "{r}"], ["--output", "is a file", "give a folder path"]),
    (["--model", "{r}"], ["--model", "not a Hugging Face checkpoint folder"]),
    (["--model", "{folder}"], ["--model", "not a Hugging Face checkpoint folder"]),
    (["--dtype", "float8"], ["argument --dtype", "invalid choice"]),
    (["--n", "many"], ["argument --n", "invalid int value"]),
])
def test_evaluate_arguments_fail_fast(tmp_path, capsys, no_model, extra, needles):
    r = tmp_path / "r.json"
    r.write_text("[[0, 0]]")
    (tmp_path / "d").mkdir()
    (tmp_path / "folder").mkdir()
    sub = {"{r}": str(r), "{d}": str(tmp_path / "d"), "{missing}": str(tmp_path / "missing"),
           "{folder}": str(tmp_path / "folder")}
    _usage(_evaluate(tmp_path, *[sub.get(x, x) for x in extra]), capsys, *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path, capsys, no_model):
    _usage(["info", "--device", "cuda"], capsys, "--device cuda", "no CUDA GPU", "--device cpu")
    _usage(_evaluate(tmp_path, "--device", "cuda:1"), capsys, "no CUDA GPU")


def test_plot_and_demo_arguments_fail_fast(tmp_path, capsys, no_model):
    r = tmp_path / "r.json"
    r.write_text("[[0, 0]]")
    _usage(["plot", tmp_path / "missing.json"], capsys, "no such file", "focuslens score")
    _usage(["plot", tmp_path], capsys, "is a folder")
    _usage(["plot", r, "--top-k", "0"], capsys, "--top-k must be >= 1")
    _usage(["plot", r, "--output", tmp_path], capsys, "--output", "is a folder")
    _usage(["plot", r, "--output", r / "fig"], capsys, "is a file, not a folder")
    _usage(["demo", "--n-test", "0", "--output", tmp_path / "demo"], capsys, "--n-test must be >= 1")
    _usage(["demo", "--output", r], capsys, "--output", "is a file")


# --------------------------------------------------------------------------------------------------
# 6. Corrupt files: exit 2 with one line naming the file and the fix
# --------------------------------------------------------------------------------------------------


def _corrupt_artefacts(model, tmp_path) -> dict[str, Path]:
    good = tmp_path / "good"
    _fd(model).save(good)
    cfg = json.loads((good / "config.json").read_text())
    out = {}

    def variant(name, *, config=None, weights=None):
        p = tmp_path / name
        p.mkdir()
        (p / "config.json").write_text(config if config is not None else json.dumps(cfg))
        (p / "directions.safetensors").write_bytes(weights if weights is not None
                                                   else (good / "directions.safetensors").read_bytes())
        out[name] = p

    w = (good / "directions.safetensors").read_bytes()
    variant("truncated", weights=w[: len(w) // 2])
    variant("tiny_weights", weights=w[:5])
    flipped = bytearray(w)
    flipped[-3] ^= 0xFF
    variant("flipped", weights=bytes(flipped))
    variant("swapped", config=json.dumps({**cfg, "heads": cfg["heads"][::-1]}))
    variant("as_list", config="[1, 2]")
    variant("null_fp", config=json.dumps({**cfg, "fingerprint": None}))
    variant("no_heads", config=json.dumps({k: v for k, v in cfg.items() if k != "heads"}))
    variant("float_heads", config=json.dumps({**cfg, "heads": [[0, 0.5], [1, 2]]}))
    variant("not_json", config="{trunc")
    variant("newer", config=json.dumps({**cfg, "format_version": 99}))
    variant("other_format", config=json.dumps({**cfg, "format": "something.else"}))
    from safetensors.torch import save_file

    variant("two_tensors")
    save_file({"vectors": torch.zeros(2, 16), "extra": torch.zeros(1)}, str(out["two_tensors"] / "directions.safetensors"))
    return out


_ARTEFACT_ERRORS = {
    "truncated": r"directions\.safetensors: cannot be read as safetensors .*truncated or corrupt; re-save or re-train",
    "tiny_weights": r"directions\.safetensors: cannot be read as safetensors",
    "flipped": r"payload checksum does not match.*re-save or re-train",
    "swapped": r"payload checksum does not match.*heads/site/fingerprint.*re-save or re-train",
    "as_list": r"config\.json is not a focuslens FocusDirections config .*got list",
    "null_fp": r"config\.json: 'fingerprint' must be the model's architecture object, got None",
    "no_heads": r"config\.json: 'heads' must be a list of \[layer, head\] pairs of ints",
    "float_heads": r"'heads' must be a list of \[layer, head\] pairs of ints",
    "not_json": r"config\.json: not valid JSON",
    "newer": r"newer focuslens \(format 99\); upgrade",
    "other_format": r"not a focuslens FocusDirections config",
    "two_tensors": r"exactly one tensor 'vectors', found \['extra', 'vectors'\]",
}


def test_corrupt_artefacts_are_clear_errors(tiny_llama, tmp_path):
    from focuslens.directions import FocusDirections

    arts = _corrupt_artefacts(tiny_llama, tmp_path)
    assert set(arts) == set(_ARTEFACT_ERRORS)
    for name, p in arts.items():
        with pytest.raises(UsageError, match=_ARTEFACT_ERRORS[name]) as e:
            FocusDirections.load(p)
        assert str(p) in str(e.value), name
    FocusDirections.load(tmp_path / "good", model=tiny_llama)


def test_corrupt_artefacts_in_the_cli(tiny_llama, tmp_path, capsys, no_model):
    arts = _corrupt_artefacts(tiny_llama, tmp_path)
    for name in ("truncated", "flipped", "swapped", "as_list", "null_fp", "no_heads", "not_json"):
        line = _usage(_evaluate(tmp_path, "--directions", arts[name]), capsys, str(arts[name]))
        assert re.search(_ARTEFACT_ERRORS[name], line), (name, line)


def test_artefact_without_checksum_loads_with_a_warning(tiny_llama, tmp_path):
    from focuslens.directions import FocusDirections

    d = _fd(tiny_llama)
    d.save(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    del cfg["checksum"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="no payload checksum.*re-save it"):
        old = FocusDirections.load(tmp_path / "old")
    assert torch.equal(old.vectors, d.vectors)
    old.save(tmp_path / "old")  # re-saving adds the checksum
    assert json.loads((tmp_path / "old" / "config.json").read_text())["checksum"] == d.payload_checksum()


def test_corrupt_data_files(tmp_path, capsys, no_model):
    good = _litm_file(tmp_path / "good.jsonl.gz")
    raw = good.read_bytes()
    cases = {
        "truncated.jsonl.gz": (raw[: len(raw) // 2], ["cannot decompress", "EOFError", "truncated or not gzip",
                                                     "download it again"]),
        "plain.jsonl.gz": (b'{"question": "q"}\n', ["cannot decompress", "BadGzipFile", "truncated or not gzip"]),
        "badjson.jsonl": (b'{"question": \n', ["badjson.jsonl:1: not valid JSON"]),
        "list.jsonl": (b"[1, 2]\n", ["list.jsonl:1: malformed record: expected a JSON object"]),
        "latin1.jsonl": ('{"question": "caf\u00e9"}\n'.encode("latin-1"), ["latin1.jsonl: not UTF-8 text"]),
    }
    for name, (content, needles) in cases.items():
        (tmp_path / name).write_bytes(content)
        _usage(_evaluate(tmp_path, "--data", tmp_path / name), capsys, name, *needles)
    crc = bytearray(raw)
    crc[-8] ^= 0xFF  # the gzip trailer's CRC
    (tmp_path / "crc.jsonl.gz").write_bytes(bytes(crc))
    _usage(_evaluate(tmp_path, "--data", tmp_path / "crc.jsonl.gz"), capsys, "crc.jsonl.gz", "cannot decompress")
    _usage(_evaluate(tmp_path, "--data", good, "--offset", 5), capsys, "leaves none of the 3", "lower --offset")


def test_corrupt_model_config(tiny_folder, tmp_path, capsys):
    bad = tmp_path / "model"
    bad.mkdir()
    for f in tiny_folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text("{not json")
    _usage(["info", "--model", bad], capsys, f"--model {bad}", "cannot load this model",
           "complete Hugging Face checkpoint")


# --------------------------------------------------------------------------------------------------
# The error boundary itself: unexpected errors, --debug, interrupts
# --------------------------------------------------------------------------------------------------


def test_unexpected_error_is_one_line_with_the_traceback_file(monkeypatch, capsys):
    def broken(args):
        raise KeyError("heads")

    monkeypatch.setitem(cli.COMMANDS, "info", broken)
    code, err = _cli(["info"], capsys)
    assert code == 1 and len(err) == 1, err
    assert "internal error (KeyError: missing key 'heads')" in err[0] and "--debug" in err[0]
    where = Path(re.search(r"written to (\S+)", err[0]).group(1))
    try:
        text = where.read_text()
        assert "Traceback" in text and "KeyError: 'heads'" in text and "broken" in text
    finally:
        where.unlink()
    capsys.readouterr()
    assert cli.main(["info", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError" in err
    for line in err.splitlines():
        m = re.search(r"written to (\S+)", line)
        if m:
            Path(m.group(1)).unlink()


def test_debug_shows_the_traceback_of_a_usage_error(tmp_path, capsys, no_model):
    capsys.readouterr()
    assert cli.main(["evaluate", "--offset", "-1", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UsageError: --offset must be >= 0" in err
    assert err.strip().splitlines()[-1].startswith("focuslens evaluate: error: --offset must be >= 0")


def test_interrupt_messages_say_whether_a_rerun_resumes(tiny_folder, tmp_path, capsys, monkeypatch):
    import focuslens.evaluation.runner
    import focuslens.score.contextual

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(focuslens.score.contextual, "score_dataset", interrupted)
    monkeypatch.setattr(focuslens.evaluation.runner, "evaluate", interrupted)
    code, err = _cli(["score", "--model", tiny_folder, "--n", 1, "--n-docs", 2, "--output", tmp_path / "s"], capsys)
    assert code == 130 and err == ["focuslens score: interrupted; score does not resume: a rerun starts over"]
    code, err = _cli(["evaluate", "--model", tiny_folder, "--n", 1, "--n-docs", 2, "--output", tmp_path / "e"], capsys)
    assert code == 130 and err == ["focuslens evaluate: interrupted; rerun the same command to resume "
                                   "(finished records are kept)"]
    assert set(cli.RESUMES) == set(cli.COMMANDS)


def test_end_to_end_exit_codes_in_a_subprocess(tmp_path, tiny_llama):
    """The installed entry point: real exit status 2, one stderr line, no traceback."""
    arts = _corrupt_artefacts(tiny_llama, tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for argv, needle in [(["evaluate", "--directions", str(arts["truncated"])], "cannot be read as safetensors")]:
        p = subprocess.run([sys.executable, "-m", "focuslens.cli", *argv], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=120)
        lines = [x for x in p.stderr.splitlines() if x.strip()]
        assert p.returncode == 2 and len(lines) == 1 and needle in lines[0], p.stderr


# --------------------------------------------------------------------------------------------------
# 7. NaN scores, heads must be ints
# --------------------------------------------------------------------------------------------------


def test_nan_scores_rank_last():
    from focuslens.score.ranking import DatasetScores, contextual_heads

    t = torch.tensor([[0.1, float("nan"), 0.9, 0.5]])
    assert contextual_heads(t, k=4) == [(0, 2), (0, 3), (0, 0), (0, 1)]
    ds = DatasetScores(mean={"relevant": t}, stderr={"relevant": t}, per_example={}, n=1)
    assert ds.top_k(3) == [(0, 2), (0, 3), (0, 0)] and [r[:2] for r in ds.ranking()][-1] == (0, 1)


@pytest.mark.parametrize("heads", [[(0.0, 1.5)], [(0, 1.5)], [(8.7, 0)], [(True, 0)], [(0,)], [(0, 1, 2)], ["ab"]])
def test_float_or_malformed_heads_are_refused(tiny_llama, heads):
    with pytest.raises(ValueError, match=r"pairs of ints|\(layer, head\)"):
        check_heads(tiny_llama, heads)
    from focuslens.intervene.eager import split_softmax

    with pytest.raises(ValueError):
        split_softmax(tiny_llama, heads, (1, 3), 0.5)
    assert count_hooks(tiny_llama) == 0


def test_heads_out_of_range_and_duplicates(tiny_llama):
    with pytest.raises(ValueError, match=r"Unknown head \(layer=2, head=0\): this model has layers 0..1"):
        check_heads(tiny_llama, [(2, 0)])
    with pytest.raises(ValueError, match="listed twice"):
        check_heads(tiny_llama, [(0, 1), (0, 1)])


def test_inject_vectors_float_duplicate_keys_refused(tiny_llama):
    from focuslens.intervene.eager import inject_vectors

    u = torch.ones(model_info(tiny_llama).d_head)
    # {(0, 0): u, (0.0, 0.0): -u} is ONE key in Python ((0, 0) == (0.0, 0.0), same hash): no function can see
    # the duplicate. What inject_vectors must do is refuse float keys, which int() truncated into collisions.
    assert len({(0, 0): u, (0.0, 0.0): -u}) == 1  # noqa: F601 - the point
    try:
        h = inject_vectors(tiny_llama, {(0, 1): u, (0.0, 1.5): -u})
    except ValueError as e:
        assert re.search("pairs of ints|twice", str(e)) and count_hooks(tiny_llama) == 0
        return
    h.remove()
    pytest.fail("{(0, 1): u, (0.0, 1.5): -u} was accepted: int() truncated 1.5 and one vector was silently dropped")


def test_negative_alpha_max_refused_by_apply(tiny_llama):
    t = torch.tensor([0, 5, 6, 7, 8, 9])
    for bad in (-1, 0, float("inf")):
        with pytest.raises(ValueError, match="alpha_max .* must be finite and > 0"):
            _fd(tiny_llama).apply(tiny_llama, alpha="auto", tokens=t, alpha_max=bad)
    assert count_hooks(tiny_llama) == 0


def test_steer_negative_alpha_max_refused(tiny_llama):
    from focuslens.directions.artefact import Steer

    with pytest.raises(ValueError, match="alpha_max"):
        Steer(_fd(tiny_llama), alpha="auto", alpha_max=-1)


# --------------------------------------------------------------------------------------------------
# 8. FocusDirections.save: atomic against kills, one writer at a time
# --------------------------------------------------------------------------------------------------


def _artefact_state(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def test_save_recovers_from_a_kill_between_the_renames(tiny_llama, tmp_path):
    """The two-rename fallback killed in its gap: only .fd.old-* and .fd.tmp-* remain; load puts the
    old artefact back and removes the leftovers, and so does the next save."""
    from focuslens.directions import FocusDirections

    old = _fd(tiny_llama, seed=0)
    old.save(tmp_path / "fd")
    os.replace(tmp_path / "fd", tmp_path / ".fd.old-999-1")
    (tmp_path / ".fd.tmp-abc").mkdir()
    (tmp_path / ".fd.tmp-abc" / "directions.safetensors").write_bytes(b"half")
    back = FocusDirections.load(tmp_path / "fd")
    assert torch.equal(back.vectors, old.vectors) and _artefact_state(tmp_path) == ["fd"]

    os.replace(tmp_path / "fd", tmp_path / ".fd.old-999-2")
    new = _fd(tiny_llama, seed=1)
    new.save(tmp_path / "fd")
    assert torch.equal(FocusDirections.load(tmp_path / "fd").vectors, new.vectors)
    assert _artefact_state(tmp_path) == ["fd"]


def test_leftover_of_an_exchange_is_cleaned(tiny_llama, tmp_path):
    """Killed after the atomic exchange: the new artefact is in place, the old one in .fd.tmp-*."""
    from focuslens.directions import FocusDirections

    new = _fd(tiny_llama, seed=1)
    new.save(tmp_path / "fd")
    _fd(tiny_llama, seed=0).save(tmp_path / "elsewhere")
    os.replace(tmp_path / "elsewhere", tmp_path / ".fd.tmp-xyz")
    assert torch.equal(FocusDirections.load(tmp_path / "fd").vectors, new.vectors)
    assert _artefact_state(tmp_path) == ["fd"]


_KILL_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    import focuslens.core.io as fio
    from focuslens.directions import FocusDirections
    mode, path = sys.argv[1], sys.argv[2]
    d = FocusDirections.load(path)
    if mode == "fallback":
        fio._exchange = lambda a, b: False
        real = os.replace
        calls = []
        def replace(a, b):
            real(a, b)
            calls.append(1)
            if len(calls) == 2:   # 1: config.json into the temp folder, 2: the old artefact aside
                os._exit(9)   # killed between the two renames: no cleanup runs
        os.replace = replace
    else:
        real = fio._exchange
        def exchange(a, b):
            real(a, b)
            os._exit(9)       # killed right after the exchange
        fio._exchange = exchange
    d._replace(vectors=d.vectors + 1).save(path)
""")


@pytest.mark.parametrize("mode", ["fallback", "exchange"])
def test_killed_save_leaves_a_loadable_artefact(tiny_llama, tmp_path, mode):
    from focuslens.directions import FocusDirections

    old = _fd(tiny_llama, seed=0)
    old.save(tmp_path / "fd")
    p = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, mode, str(tmp_path / "fd")], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 9, p.stderr
    assert any(n.startswith(".fd.") for n in _artefact_state(tmp_path))  # the kill left something behind
    got = FocusDirections.load(tmp_path / "fd").vectors
    assert torch.equal(got, old.vectors if mode == "fallback" else old.vectors + 1)
    assert _artefact_state(tmp_path) == ["fd"]


def test_concurrent_save_is_a_clear_error_and_keeps_the_artefact(tiny_llama, tmp_path):
    from focuslens.directions import FocusDirections

    old = _fd(tiny_llama, seed=0)
    old.save(tmp_path / "fd")
    held = _hold_lock(tmp_path / "fd", pid="4242")
    try:
        with pytest.raises(OutputBusy, match=r"another focuslens process is writing .*fd \(pid 4242\); wait for it"):
            _fd(tiny_llama, seed=1).save(tmp_path / "fd")
    finally:
        held.close()
    assert torch.equal(FocusDirections.load(tmp_path / "fd").vectors, old.vectors)
    assert [n for n in _artefact_state(tmp_path) if n.startswith(".fd.tmp") or n.startswith(".fd.old")] == []
    _fd(tiny_llama, seed=1).save(tmp_path / "fd")  # free again once the other writer is gone


def test_output_lock_against_a_real_second_process(tmp_path):
    script = textwrap.dedent("""
        import sys, types
        pkg = types.ModuleType("focuslens")  # focuslens.core.io alone, without the package's heavy __init__
        pkg.__path__ = [sys.argv[2]]
        sys.modules["focuslens"] = pkg
        from focuslens.core.io import output_lock
        with output_lock(sys.argv[1]):
            print("locked", flush=True)
            sys.stdin.readline()
    """)
    target = tmp_path / "out.jsonl"
    p = subprocess.Popen([sys.executable, "-c", script, str(target), str(ROOT / "focuslens")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(OutputBusy, match=rf"writing {re.escape(str(target))} \(pid {p.pid}\); wait for it to "
                                             "finish or choose another output"):
            with output_lock(target):
                pass
    finally:
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait(timeout=60)
    with output_lock(target):  # released with the process
        with output_lock(target):  # re-entrant in one process
            pass
    assert not lock_path(target).exists()


def test_save_refuses_to_replace_a_folder_that_is_not_an_artefact(tiny_llama, tmp_path):
    """atomic_dir would swap the folder away: saving over e.g. the home folder must be refused."""
    pytest.importorskip("safetensors")
    keep = tmp_path / "notes" / "a.txt"
    keep.parent.mkdir()
    keep.write_text("keep me")
    with pytest.raises(UsageError, match="not a FocusDirections folder.*would be deleted"):
        _fd(tiny_llama).save(tmp_path / "notes")
    assert keep.read_text() == "keep me"
    with pytest.raises(UsageError, match="is not a folder"):
        _fd(tiny_llama).save(keep)


# --------------------------------------------------------------------------------------------------
# 9. Concurrent and interrupted CLI runs
# --------------------------------------------------------------------------------------------------


def test_second_evaluate_on_the_same_records_is_refused(tiny_folder, tmp_path, capsys):
    argv = ["evaluate", "--model", tiny_folder, "--n", 2, "--n-docs", 2, "--max-new-tokens", 2,
            "--output", tmp_path / "ev"]
    code, _ = _cli(argv, capsys)
    assert code == 0
    (rec,) = list((tmp_path / "ev").glob("*.jsonl"))
    before = rec.read_bytes()
    held = _hold_lock(rec, pid="777")
    try:
        _usage(argv, capsys, "another focuslens process is writing", rec.name, "(pid 777)", "choose another output")
    finally:
        held.close()
    assert rec.read_bytes() == before and len(before.splitlines()) == 3  # header + 2 records, no duplicates
    code, _ = _cli(argv, capsys)  # free again: resumes, writes nothing new
    assert code == 0 and rec.read_bytes() == before


def test_second_sweep_on_the_same_output_is_refused(tiny_folder, tmp_path, capsys, monkeypatch):
    import focuslens.evaluation.runner

    monkeypatch.setattr(focuslens.evaluation.runner, "evaluate", lambda *a, **k: pytest.fail("evaluated while locked"))
    (tmp_path / "r.json").write_text("[[0, 0], [1, 1]]")
    (tmp_path / "out").mkdir()
    held = _hold_lock(tmp_path / "out" / "sweep.json", pid="31337")
    try:
        _usage(["sweep", "--model", tiny_folder, "--heads", tmp_path / "r.json", "--ks", 1, "--n", 1, "--n-docs", 2,
                "--output", tmp_path / "out"], capsys, "sweep.json (pid 31337)")
    finally:
        held.close()


def test_library_writers_write_atomically():
    """No plain write in the modules that write results (everything goes through focuslens.core.io)."""
    plain = re.compile(r"\.write_text\(|\.write_bytes\(|open\([^)]*['\"][wa]b?['\"]")
    for name in ("cli.py", "score/ranking.py", "score/contextual.py", "directions/artefact.py", "tasks/litm.py",
                 "tasks/records.py"):
        src = (ROOT / "focuslens" / name).read_text()
        hits = [line for line in src.splitlines() if plain.search(line) and "tmp" not in line]
        assert hits == [], (name, hits)
    assert "atomic_write_json(out / \"sweep.json\"" in (ROOT / "focuslens" / "cli.py").read_text()


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    from focuslens.core.io import atomic_write

    p = atomic_write(tmp_path / "sweep.json", '{"old": 1}')

    def dies(tmp):
        Path(tmp).write_text('{"new": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(p, dies)
    assert json.loads(p.read_text()) == {"old": 1} and _artefact_state(tmp_path) == ["sweep.json"]


# --------------------------------------------------------------------------------------------------
# Hooks stay clean when an intervention is refused
# --------------------------------------------------------------------------------------------------


def test_refused_interventions_leave_no_hooks(tiny_llama, tiny_gpt2):
    from focuslens.intervene.eager import inject_vectors, split_softmax

    d_head = model_info(tiny_llama).d_head
    bad = [lambda: inject_vectors(tiny_llama, {(0, 0): torch.full((d_head,), float("nan"))}),
           lambda: inject_vectors(tiny_llama, {(0, 0): torch.ones(d_head + 1)}),
           lambda: inject_vectors(tiny_llama, {(0, 0): torch.ones(d_head)}, alpha=float("inf")),
           lambda: inject_vectors(tiny_llama, {}),
           lambda: split_softmax(tiny_llama, [(0, 0)], (1, 3), float("nan")),
           lambda: split_softmax(tiny_llama, [(5, 0)], (1, 3), 0.5),
           lambda: _fd(tiny_llama).apply(tiny_gpt2),
           lambda: _fd(tiny_llama).apply(tiny_llama, alpha="auto")]
    for f in bad:
        with pytest.raises(ValueError):
            f()
        assert count_hooks(tiny_llama) == 0 and count_hooks(tiny_gpt2) == 0
