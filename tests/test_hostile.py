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
    """grep focuslens/: only ``.eval()`` method calls are allowed; no ``torch.load`` at all (tensors are safetensors)."""
    hits = []
    for f in sorted((ROOT / "focuslens").rglob("*.py")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for m in _CODE_PATTERN.finditer(code):
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
    with pytest.raises(UsageError, match="not a FocusDirections folder.*no file of yours is replaced"):
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


# --------------------------------------------------------------------------------------------------
# 10. Nothing silent, nothing lost (issue #34): writes never destroy what focuslens did not create,
#     records carry their integrity, a read-only file system can still read finished records
# --------------------------------------------------------------------------------------------------


def _records_run(model, out, n=2, **kw):
    from focuslens.evaluation.runner import evaluate
    from focuslens.tasks import make_synthetic_qa

    return evaluate(model, make_synthetic_qa(n, n_docs=2, seed=4), output=out, progress=False, max_new_tokens=2, **kw)


@pytest.mark.parametrize("text", ["line one\nline two", "line one\nline two\n", '{"a": 1}\n{"b": 2}\n', "x"])
@pytest.mark.parametrize("resume", [True, False])
def test_output_that_is_not_a_records_file_is_never_modified(tiny_llama, tmp_path, text, resume):
    """A user's notes (with or without a trailing newline) given as output= used to be cut to line one."""
    notes = tmp_path / "notes.txt"
    notes.write_text(text)
    with pytest.raises(UsageError, match=r"notes\.txt is not a focuslens records file.*choose another output path"):
        _records_run(tiny_llama, notes, resume=resume)
    assert notes.read_text() == text
    assert not lock_path(notes).exists()


def test_records_output_through_a_symlink_is_refused(tiny_llama, tmp_path):
    user = tmp_path / "user.txt"
    user.write_text("precious\nmore\nend")
    link = tmp_path / "out.jsonl"
    link.symlink_to(user)
    for resume in (True, False):
        with pytest.raises(UsageError, match=r"out\.jsonl is a symbolic link .*give the real path"):
            _records_run(tiny_llama, link, resume=resume)
    assert user.read_text() == "precious\nmore\nend" and link.is_symlink()
    # a link to a finished records file is refused as well (the file it points to is never appended to)
    real = tmp_path / "real.jsonl"
    _records_run(tiny_llama, real)
    (tmp_path / "via.jsonl").symlink_to(real)
    with pytest.raises(UsageError, match="symbolic link"):
        _records_run(tiny_llama, tmp_path / "via.jsonl")


def test_save_keeps_the_other_files_of_an_artefact_folder(tiny_llama, tmp_path):
    from focuslens.directions import FocusDirections

    pytest.importorskip("safetensors")
    fd = tmp_path / "fd"
    _fd(tiny_llama, seed=0).save(fd)
    (fd / "NOTES.md").write_text("my notes")
    (fd / "plots").mkdir()
    (fd / "plots" / "a.png").write_bytes(b"\x89PNG")
    (fd / "NOTES.md").chmod(0o600)
    new = _fd(tiny_llama, seed=1)
    new.save(fd)
    assert (fd / "NOTES.md").read_text() == "my notes" and (fd / "plots" / "a.png").read_bytes() == b"\x89PNG"
    assert (fd / "NOTES.md").stat().st_mode & 0o777 == 0o600  # the user's file keeps its mode
    assert torch.equal(FocusDirections.load(fd).vectors, new.vectors)
    assert _artefact_state(tmp_path) == ["fd"]  # no leftovers beside it
    # a folder whose config.json is not a FocusDirections config (a model folder) is refused, untouched
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(UsageError, match="config.json is not a FocusDirections config"):
        new.save(model_dir)
    assert json.loads((model_dir / "config.json").read_text()) == {"architectures": ["LlamaForCausalLM"]}
    # a symbolic link as the artefact folder is refused (the swap would move the link)
    (tmp_path / "link").symlink_to(fd, target_is_directory=True)
    with pytest.raises(UsageError, match="symbolic link"):
        new.save(tmp_path / "link")


def _edit_line(path: Path, lineno: int, edit) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = edit(lines[lineno - 1], lines[0])
    path.write_text("\n".join(lines) + "\n")


def _set(field, value):
    def edit(line, header):
        rec = json.loads(line)
        rec[field] = value(rec[field]) if callable(value) else value
        return json.dumps(rec)
    return edit


@pytest.mark.parametrize("lineno,edit,needle", [
    (2, _set("em", lambda em: not em), "content does not match its line_hash"),
    (3, _set("prediction", "Paris"), "content does not match its line_hash"),
    (2, lambda line, header: "null", "the line is null, not a record"),
    (3, lambda line, header: "[1, 2]", r"the line is \[1, 2\], not a record"),
    (2, _set("key", None), "'key' is null, not a string"),
    (2, _set("n_new_tokens", "3"), "'n_new_tokens' is \"3\", not an integer"),
    (2, lambda line, header: json.dumps({k: v for k, v in json.loads(line).items() if k != "key"}), "has no 'key'"),
    (2, lambda line, header: json.dumps({k: v for k, v in json.loads(line).items() if k != "line_hash"}), "no 'line_hash'"),
    (2, lambda line, header: line[:30], "not valid JSON.*truncated or damaged"),
    (3, lambda line, header: line + "\n" + line, r"second record for example .* \(the first is on line 3\)"),
    (3, lambda line, header: header, "a second header line"),
])
def test_edited_or_malformed_records_are_refused(tiny_llama, tmp_path, lineno, edit, needle):
    """Each of these used to be resumed and counted, or died with TypeError / AttributeError / KeyError."""
    out = tmp_path / "r.jsonl"
    _records_run(tiny_llama, out)
    _edit_line(out, lineno, edit)
    before = out.read_bytes()
    shown_line = lineno + 1 if "second record" in needle else lineno
    with pytest.raises(UsageError, match=rf"r\.jsonl:{shown_line}: .*{needle}.*delete that line \(or the whole file\)"
                                         r".*Use another output file, or resume=False"):
        _records_run(tiny_llama, out)
    assert out.read_bytes() == before  # refused before anything was written
    res = _records_run(tiny_llama, out, resume=False)  # the fix the message names works
    assert res.n_resumed == 0 and len(res) == 2


def test_weights_digest_covers_every_weight(tiny_llama, tmp_path):
    """A change in a weight entry that the old strided sample skipped gives another digest, so no resume."""
    from focuslens.core.models import model_identity, weights_digest
    from focuslens.testing import tiny_model

    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    assert weights_digest(a) == weights_digest(b)
    _, big = max(b.named_parameters(), key=lambda kv: kv[1].numel())
    assert big.numel() > 4096 * 2  # entry 1 was not in the old sample (stride numel // 4096)
    out = tmp_path / "r.jsonl"
    _records_run(a, out)
    with torch.no_grad():
        big.view(-1)[1] += 1.0
    assert weights_digest(b) != weights_digest(a)
    assert model_identity(b)["weights"] != model_identity(a)["weights"]
    with pytest.raises(ValueError, match="model_weights"):
        _records_run(b, out)
    # the cache sees in-place changes made with torch ops (version counter) ...
    d0 = weights_digest(b)
    with torch.no_grad():
        big.view(-1)[3] -= 1.0
    d1 = weights_digest(b)
    assert d1 != d0
    # ... and a write through .data at a probed entry (entry 0 always is); refresh=True recomputes anyway
    big.data.view(-1)[0] += 1.0
    d2 = weights_digest(b)
    assert d2 != d1
    big.data.view(-1)[5] += 1.0  # not probed, and .data bumps no counter: the cache cannot see it
    assert weights_digest(b, refresh=True) != d2
    # buffers count too
    bufs = [t for _, t in b.named_buffers() if t.numel() and t.is_floating_point()]
    if bufs:
        d3 = weights_digest(b)
        with torch.no_grad():
            bufs[0].view(-1)[0] += 1.0
        assert weights_digest(b) != d3


def _read_only_fs(monkeypatch, folder: Path) -> None:
    """Creating any file in ``folder`` fails as on a read-only mount (EROFS); reading works."""
    import errno

    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if Path(os.fsdecode(path)).absolute().parent == folder and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


def test_finished_records_are_read_on_a_read_only_file_system(tiny_llama, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    first = _records_run(tiny_llama, out, n=2)
    before = out.read_bytes()
    _read_only_fs(monkeypatch, tmp_path)
    res = _records_run(tiny_llama, out, n=2)  # nothing left to compute: no lock, no write
    assert res.n_resumed == 2 and res.predictions == first.predictions
    assert out.read_bytes() == before and not lock_path(out).exists()
    with pytest.raises(UsageError, match=r"cannot add records at .*r\.jsonl: its folder is not writable .*"
                                         r"Read-only file system.*2 finished records were read"):
        _records_run(tiny_llama, out, n=3)  # one example is missing: writing it is refused, clearly
    assert out.read_bytes() == before
    with pytest.raises(UsageError, match="cannot write a new records file"):
        _records_run(tiny_llama, out, n=2, resume=False)
    assert out.read_bytes() == before
    # a busy output is still refused (another process holds the lock)
    monkeypatch.undo()
    held = _hold_lock(out)
    try:
        with pytest.raises(OutputBusy, match="pid 4242"):
            _records_run(tiny_llama, out, n=2)
    finally:
        held.close()


def test_training_checkpoint_keeps_other_files(tiny_llama, tmp_path):
    """A checkpoint save removes only the tensors files it wrote, never a user's file of a similar name."""
    from focuslens.directions.checkpoint import _Checkpoint

    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "NOTES.md").write_text("notes")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(folder / "checkpoint-e0007.safetensors"))  # the user's, no focuslens header
    ck = _Checkpoint(folder, {"run": 1})
    u = torch.nn.Parameter(torch.zeros(2, 4))
    opt = torch.optim.Adam([u])
    for epoch in (1, 2):
        ck.save(u=u, best_u=u, opt=opt, epoch=epoch, best_val=1.0, bad=0, hist=[])
    assert sorted(p.name for p in folder.iterdir()) == ["NOTES.md", "checkpoint-e0002.safetensors",
                                                       "checkpoint-e0007.safetensors", "checkpoint.json"]
    assert ck.load((2, 4))["epoch"] == 2


# --------------------------------------------------------------------------------------------------
# Issue #34, parts 3-5: every table knows its model, no silent overflow, every error clear
# --------------------------------------------------------------------------------------------------


def _scores_file(path: Path, model, *, shape=(30, 9), fp_shape=None, name="SmolLM2-135M-Instruct", **fp_extra) -> Path:
    """A ranking JSON as ``DatasetScores.save`` writes it, with tables of ``shape`` and a fingerprint that is
    ``model``'s with ``n_layers x n_heads = fp_shape`` (default: ``shape``) and ``fp_extra``."""
    from focuslens.score.ranking import RANKING_FORMAT

    L, H = fp_shape or shape
    fp = {**model_info(model).fingerprint(), "n_layers": L, "n_heads": H, **fp_extra}
    table = torch.arange(shape[0] * shape[1], dtype=torch.float32).reshape(shape).tolist()
    path.write_text(json.dumps({"format": RANKING_FORMAT, "model": name, "fingerprint": fp, "n": 4,
                                "ranking": [], "mean": {"relevant": table}, "stderr": {"relevant": table}}))
    return path


def test_scores_of_another_model_are_refused_on_every_route(tiny_llama, tmp_path):
    """A 30 x 9 ranking used with a 2 x 4 model: refused by use_scores, heads, heatmap, the figures given a
    model, DatasetScores.load(model=) and load_heads(model=), each naming both shapes and both models."""
    import focuslens as fl
    from focuslens.plot.figures import finder_heatmaps, head_heatmap
    from focuslens.score.ranking import DatasetScores, check_scores, load_heads

    p = _scores_file(tmp_path / "smol.json", tiny_llama)
    ds = DatasetScores.load(p)  # consistent in itself: loads
    lens = fl.FocusLens(tiny_llama)
    routes = {
        "use_scores(path)": lambda: lens.use_scores(p),
        "use_scores(ds)": lambda: lens.use_scores(ds),
        "use_scores(tensor)": lambda: lens.use_scores(torch.rand(30, 9)),
        "heads(scores=)": lambda: lens.heads(3, scores=ds),
        "heatmap(ds)": lambda: lens.heatmap(ds),
        "head_heatmap(model=)": lambda: head_heatmap(ds, model=tiny_llama),
        "head_heatmap(tensor, model=)": lambda: head_heatmap(torch.rand(30, 9), model=tiny_llama),
        "finder_heatmaps(model=)": lambda: finder_heatmaps({"contextual": ds}, model=tiny_llama),
        "DatasetScores.load(model=)": lambda: DatasetScores.load(p, model=tiny_llama),
        "load_heads(model=)": lambda: load_heads(p, model=tiny_llama),
        "check_scores": lambda: check_scores(ds, tiny_llama),
    }
    for route, f in routes.items():
        with pytest.raises(UsageError, match="another model") as e:
            f()
        msg = str(e.value)
        assert "2 x 4" in msg or "2 layers x 4 heads" in msg, (route, msg)
        if route != "load_heads(model=)":  # a ranking file's heads carry the fingerprint, not the table
            assert "30 layers x 9 heads" in msg, (route, msg)
        if route not in ("use_scores(tensor)", "head_heatmap(tensor, model=)"):
            assert "SmolLM2-135M-Instruct" in msg, (route, msg)
        assert "tiny-llama" in msg or route == "load_heads(model=)", (route, msg)
    assert lens.scores is None  # nothing was kept
    # same shape, another architecture (d_head differs): refused too, naming the field
    q = _scores_file(tmp_path / "other.json", tiny_llama, shape=(2, 4), d_head=999)
    with pytest.raises(UsageError, match=r"d_head=999 there, 16 here"):
        lens.use_scores(q)
    with pytest.raises(UsageError, match=r"d_head=999 there, 16 here"):
        lens.heatmap(DatasetScores.load(q))
    # this model's own table is accepted by every route
    mine = _scores_file(tmp_path / "mine.json", tiny_llama, shape=(2, 4), name="tiny-llama")
    assert lens.use_scores(mine).heads(3) == [(1, 3), (1, 2), (1, 1)]
    assert lens.heatmap().data[0].z[1][3] == 7.0
    head_heatmap(DatasetScores.load(mine, model=tiny_llama), model=tiny_llama)


def test_ranking_tables_must_match_their_own_fingerprint(tiny_llama, tmp_path, capsys, no_model):
    from focuslens.score.ranking import DatasetScores

    p = _scores_file(tmp_path / "r.json", tiny_llama, shape=(3, 5), fp_shape=(2, 4))
    with pytest.raises(UsageError, match=r"r\.json: malformed ranking file: .*3 x 5 but its own fingerprint says "
                                         r"2 layers x 4 heads"):
        DatasetScores.load(p)
    _usage(["plot", p, "--output", tmp_path / "fig"], capsys, "r.json", "3 x 5", "2 layers x 4 heads",
           "focuslens score")
    assert not list(tmp_path.glob("fig*"))


def test_injection_that_overflows_on_the_forward_pass_raises(tiny_llama):
    """alpha * u is finite (the attach check passes) but the pass overflows: an error naming the heads and
    alpha, never NaN logits; alpha * u itself overflowing is refused at attach (check_scaled)."""
    import focuslens as fl
    from focuslens.core.generation import greedy_generate
    from focuslens.intervene.eager import inject_vectors

    d_head = model_info(tiny_llama).d_head
    toks = torch.arange(1, 12)
    with pytest.raises(ValueError, match=r"alpha \* vector for \(0, 0\) is not finite in float32"):
        inject_vectors(tiny_llama, {(0, 0): torch.full((d_head,), 1e38)}, alpha=10)
    assert count_hooks(tiny_llama) == 0
    for site, heads in (("query", [(1, 2)]), ("key", [(1, 0), (1, 1)])):  # key head 0 feeds query heads 0, 1
        with inject_vectors(tiny_llama, {(1, 0 if site == "key" else 2): torch.full((d_head,), 3e38)},
                            alpha=1.0, site=site):
            with pytest.raises(UsageError) as e:
                tiny_llama(toks[None])
            assert f"heads {heads} non-finite" in str(e.value) and "alpha = 1" in str(e.value), str(e.value)
            assert "use a smaller alpha" in str(e.value)
            with pytest.raises(UsageError, match="non-finite"):
                greedy_generate(tiny_llama, toks, max_new_tokens=2)
        assert count_hooks(tiny_llama) == 0
    lens = fl.FocusLens(tiny_llama)
    with lens.inject({(0, 1): torch.full((d_head,), 3e38)}, alpha=0.0):  # alpha 0 is the identity: no error
        assert torch.isfinite(tiny_llama(toks[None])).all()
    with lens.inject({(0, 1): torch.full((d_head,), 1e3)}, alpha=0.5):  # large but finite: runs as before
        assert torch.isfinite(tiny_llama(toks[None])).all()


def test_compose_refused_at_attach_removes_the_handles_given(tiny_llama):
    import focuslens as fl
    from focuslens.intervene.eager import compose, split_softmax

    d_head = model_info(tiny_llama).d_head
    with pytest.raises(ValueError, match="alpha must be finite"):
        fl.InjectVectors({(0, 0): torch.ones(d_head)}, alpha=float("nan"))
    h1 = split_softmax(tiny_llama, [(0, 0)], (1, 3), 0.5)
    with pytest.raises(ValueError, match="not finite in float32"):
        compose(h1, fl.InjectVectors({(0, 0): torch.full((d_head,), 1e38)}, alpha=10), model=tiny_llama)
    assert count_hooks(tiny_llama) == 0 and not h1.active


def test_bools_and_floats_are_not_numbers(tiny_llama):
    import focuslens as fl

    d_head = model_info(tiny_llama).d_head
    lens = fl.FocusLens(tiny_llama)
    lens.use_scores(torch.rand(2, 4))
    refused = {
        "heads(True)": (lambda: lens.heads(True), "got True"),
        "heads(2.0)": (lambda: lens.heads(2.0), "got 2.0"),
        "split_softmax(True)": (lambda: lens.split_softmax(True, (1, 3), 0.5), "got True"),
        "inject alpha=True": (lambda: lens.inject({(0, 0): torch.ones(d_head)}, alpha=True), "a bool is not"),
        "split_softmax tau=True": (lambda: lens.split_softmax([(0, 0)], (1, 3), True), "tau"),
        "SplitSoftmax float heads": (lambda: fl.SplitSoftmax([(0.0, 1)], 0.5), "pairs of ints"),
        "Pasta float heads": (lambda: fl.Pasta([(0, 1.0)], span=(1, 3)), "pairs of ints"),
        "Ablate float heads": (lambda: fl.Ablate([(0, 1.5)]), "pairs of ints"),
        "Ablate bool heads": (lambda: fl.Ablate([(True, 1)]), "pairs of ints"),
        "InjectVectors float key": (lambda: fl.InjectVectors({(0.0, 1): torch.ones(d_head)}), "pairs of ints"),
    }
    for name, (f, needle) in refused.items():
        with pytest.raises(ValueError, match=re.escape(needle)):
            f()
    assert count_hooks(tiny_llama) == 0


def test_score_dataset_on_unrendered_examples_says_render_first(tiny_llama):
    import focuslens as fl
    from focuslens.score.contextual import score_dataset
    from focuslens.testing import capital_example

    raw = [capital_example(i) for i in range(2)]
    for f in (lambda: score_dataset(tiny_llama, raw, response="gold", progress=False),
              lambda: fl.FocusLens(tiny_llama).score_dataset(raw, response="gold", progress=False)):
        with pytest.raises(UsageError, match=r"example 0 is a TaskExample .*render them first"):
            f()
    with pytest.raises(UsageError, match="example 0 is a str, not a rendered example"):
        score_dataset(tiny_llama, ["What is the capital?"], response="gold", progress=False)


def test_artefact_files_that_are_not_regular_files(tiny_llama, tmp_path, capsys, no_model):
    """Both files exist but one is a FIFO, a link to /dev/zero or far too large: said so, file named (a FIFO
    would block the reader forever, /dev/zero would never end)."""
    from focuslens.directions import FocusDirections
    from focuslens.directions.artefact import WEIGHTS_MAX_BYTES

    good = tmp_path / "good"
    _fd(tiny_llama).save(good)

    def variant(name, file, make):
        p = tmp_path / name
        p.mkdir()
        for f in ("config.json", "directions.safetensors"):
            if f != file:
                (p / f).write_bytes((good / f).read_bytes())
        make(p / file)
        return p

    cases = {
        variant("fifo", "directions.safetensors", os.mkfifo): "is a named pipe (FIFO), not a regular file",
        variant("zero", "directions.safetensors", lambda f: f.symlink_to("/dev/zero")):
            "(a symlink to /dev/zero) is a character device, not a regular file",
        variant("cfg_fifo", "config.json", os.mkfifo): "config.json is a named pipe (FIFO)",
        variant("huge", "directions.safetensors", lambda f: (f.write_bytes(b""), os.truncate(f, WEIGHTS_MAX_BYTES + 1))):
            f"is too large ({WEIGHTS_MAX_BYTES + 1} bytes",
    }
    for p, needle in cases.items():
        with pytest.raises(UsageError) as e:
            FocusDirections.load(p)
        assert needle in str(e.value) and str(p) in str(e.value), str(e.value)
        assert "re-save or re-train" in str(e.value)
    _usage(_evaluate(tmp_path, "--directions", tmp_path / "fifo"), capsys, "named pipe (FIFO)", "fifo")


def test_cli_resume_advice_names_cli_options(tiny_folder, tmp_path, capsys, monkeypatch):
    """The same model folder by another path resumes; a records file of another configuration is refused
    with the CLI's own fix (--output), never the library's resume=False."""
    argv = ["evaluate", "--n", 1, "--n-docs", 2, "--max-new-tokens", 2, "--output", tmp_path / "ev"]
    assert _cli([*argv, "--model", tiny_folder], capsys)[0] == 0
    monkeypatch.chdir(tiny_folder.parent)
    assert _cli([*argv, "--model", tiny_folder.name], capsys)[0] == 0  # same folder, relative path: resumed
    (records,) = (tmp_path / "ev").glob("plain_original-*.jsonl")
    lines = records.read_text().splitlines()
    head = json.loads(lines[0])
    head["config_hash"] = "0" * 16
    records.write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    line = _usage([*argv, "--model", tiny_folder], capsys, str(records), "another --output folder", "delete")
    assert "resume=False" not in line


def test_from_authors_refuses_pickles_and_names_the_file(tiny_llama, tmp_path):
    from focuslens.directions import FocusDirections

    marker = tmp_path / "PWNED"
    f = tmp_path / "a" / "head_q_directions_0.pth"
    _plant(f, marker)
    with pytest.raises(UsageError) as e:
        FocusDirections.from_authors(tmp_path / "a", tiny_llama)
    msg = str(e.value)
    assert str(f) in msg and "will not load" in msg and "weights_only" not in msg, msg
    assert not marker.exists()
    from safetensors.torch import save_file

    f.unlink()
    g = f.with_suffix(".safetensors")
    g.write_bytes(b"not a safetensors file")
    with pytest.raises(UsageError, match=re.escape(str(g))):
        FocusDirections.from_authors(tmp_path / "a", tiny_llama)
    save_file({"q": torch.zeros(4, 16), "k": torch.zeros(4, 16)}, g)
    with pytest.raises(UsageError, match=re.escape(f"{g} holds 2 tensors")):
        FocusDirections.from_authors(tmp_path / "a", tiny_llama)


def test_token_ids_outside_the_vocabulary_are_refused(tiny_llama):
    import focuslens as fl
    from focuslens.core.forward import forward_with_cache, run_until
    from focuslens.core.generation import generate_responses, greedy_generate
    from focuslens.score.contextual import score_spans

    d_vocab = tiny_llama.cfg.d_vocab
    lens = fl.FocusLens(tiny_llama)
    for bad_id in (d_vocab, -1):
        toks = torch.tensor([1, 2, bad_id, 4, 5, 6])
        calls = [lambda: score_spans(tiny_llama, toks, response=(4, 6), spans={"r": (1, 3)}),
                 lambda: lens.score(toks, response=(4, 6), relevant=(1, 3)),
                 lambda: greedy_generate(tiny_llama, toks, max_new_tokens=2),
                 lambda: lens.generate(toks, max_new_tokens=2),
                 lambda: generate_responses(tiny_llama, [toks, torch.tensor([1, 2])], max_new_tokens=2),
                 lambda: run_until(tiny_llama, toks, names=["blocks.0.attn.hook_q"]),
                 lambda: forward_with_cache(tiny_llama, toks[None])]
        for f in calls:
            with pytest.raises(UsageError, match=rf"token id {bad_id}, outside this model's vocabulary "
                                                 rf"\(ids 0..{d_vocab - 1}\)"):
                f()
    with pytest.raises(UsageError, match="must be integer token ids, got dtype float32"):
        run_until(tiny_llama, torch.tensor([1.0, 2.0]), names=["blocks.0.attn.hook_q"])


def test_deeply_nested_json_is_a_clear_error(tiny_llama, tmp_path, capsys, no_model):
    from focuslens.directions import FocusDirections
    from focuslens.score.ranking import DatasetScores, load_heads

    deep = "[" * 200_000 + "]" * 200_000
    p = tmp_path / "deep.json"
    p.write_text(deep)
    for f in (lambda: load_heads(p), lambda: DatasetScores.load(p)):
        with pytest.raises(UsageError, match=r"deep\.json: the JSON is nested too deeply"):
            f()
    art = tmp_path / "fd"
    _fd(tiny_llama).save(art)
    (art / "config.json").write_text(deep)
    with pytest.raises(UsageError, match=r"config\.json: the JSON is nested too deeply.*re-save or re-train"):
        FocusDirections.load(art)
    _usage(["plot", p, "--output", tmp_path / "fig"], capsys, "deep.json", "nested too deeply")
    data = tmp_path / "deep.jsonl"
    data.write_text(deep + "\n")
    _usage(["score", "--data", data, "--output", tmp_path / "s"], capsys, "deep.jsonl:1", "nested too deeply")


def test_mean_ablation_with_means_of_the_wrong_shape(tiny_llama):
    import focuslens as fl

    d_head = model_info(tiny_llama).d_head
    with pytest.raises(ValueError, match=rf"has 3 entries; this model's heads have d_head = {d_head}"):
        fl.Ablate([(0, 1)], mode="mean", means={(0, 1): torch.zeros(3)}).attach(tiny_llama)
    with pytest.raises(ValueError, match=rf"has 3 entries; this model's heads have d_head = {d_head}"):
        fl.FocusLens(tiny_llama).ablate([(0, 1)], mode="mean", means={(0, 1): torch.zeros(3)})
    with pytest.raises(ValueError, match=r"has shape \(2, 16\); expected \[d_head\]"):
        fl.Ablate([(0, 1)], mode="mean", means={(0, 1): torch.zeros(2, d_head)})
    assert count_hooks(tiny_llama) == 0


def test_load_model_takes_dtype_names(tiny_folder):
    from focuslens.core.models import load_model

    m = load_model(tiny_folder, dtype="float16", verbose=False)
    assert next(m.parameters()).dtype == torch.float16
    for bad in ("int8", "half precision", torch.int64, 16):
        with pytest.raises(UsageError, match=r"dtype must be a floating-point torch dtype or one of 'float32', "
                                             r"'float16', 'bfloat16'"):
            load_model(tiny_folder, dtype=bad, verbose=False)


def test_wrong_types_get_clear_errors_not_raw_tracebacks(tiny_llama, tmp_path):
    """Found by passing wrong types to the public API: each used to be a raw torch/Python error
    (``new(): invalid data type 'str'``, ``AttributeError: 'NoneType' object has no attribute 'cfg'``, a
    ``KeyError``, a ``RuntimeError`` from a reshape) or was accepted (a bool k, float heads written as ints)."""
    import focuslens as fl
    from focuslens.score.ranking import DatasetScores, contextual_heads, save_heads

    lens = fl.FocusLens(tiny_llama)
    ds = DatasetScores(mean={"relevant": torch.rand(2, 4)}, stderr={}, per_example={}, n=1)
    cases = [
        (lambda: fl.head_heatmap("ranking.json"), TypeError, "DatasetScores.load(path) first"),
        (lambda: fl.head_heatmap(None), TypeError, "needs a [layer, head] matrix"),
        (lambda: fl.head_heatmap([[1, 2], [3]]), ValueError, "rows of equal length"),
        (lambda: fl.head_heatmap(torch.rand(2, 4), top_k=True), ValueError, "top_k must be a non-negative int"),
        (lambda: contextual_heads(torch.rand(2, 4), True), ValueError, "k must be an int in 1..8, got True"),
        (lambda: ds.top_k(2.0), ValueError, "k must be an int in 1..8, got 2.0"),
        (lambda: ds.ranking("sink"), ValueError, "no 'sink' table; they have ['relevant']"),
        (lambda: contextual_heads(ds, 2, name="sink"), ValueError, "no 'sink' table"),
        (lambda: lens.heads(2, scores=ds, name="sink"), ValueError, "no 'sink' table"),
        (lambda: save_heads([(0, 1.5)], tmp_path / "h.json"), ValueError, "pairs of ints"),
        (lambda: lens.generate("What is the capital?"), TypeError, "tokenize it first"),
        (lambda: lens.generate(torch.tensor([], dtype=torch.long)), UsageError, "the prompt is empty"),
        (lambda: fl.model_info(None), TypeError, "expected a TransformerLens hooked model"),
        (lambda: fl.split_softmax(None, [(0, 0)], (1, 2), 0.5), TypeError, "expected a TransformerLens hooked model"),
        (lambda: fl.patch_heads("m", torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long),
                                lambda logits: logits.sum()), TypeError, "fl.load_model('m')"),
    ]
    for f, kind, needle in cases:
        with pytest.raises(kind) as e:
            f()
        assert needle in str(e.value), (needle, str(e.value))
    assert not (tmp_path / "h.json").exists()


def test_cli_names_what_is_wrong_with_a_special_file(tmp_path, capsys, no_model):
    """A FIFO or /dev/zero given as a file used to be called 'a folder'."""
    fifo = tmp_path / "r.json"
    os.mkfifo(fifo)
    _usage(["plot", fifo, "--output", tmp_path / "fig"], capsys, "ranking", "named pipe (FIFO), not a regular file")
    _usage(["plot", "/dev/zero", "--output", tmp_path / "fig"], capsys, "/dev/zero is a character device")
    _usage(["score", "--data", fifo, "--output", tmp_path / "s"], capsys, "--data", "named pipe (FIFO)")
    _usage(["sweep", "--heads", "/dev/zero", "--output", tmp_path / "w"], capsys, "--heads", "character device")


def test_focus_directions_of_another_model_are_refused_on_a_backend(tiny_llama, tiny_gpt2):
    """FocusLens(FusedModel).steer had no model check (the hooked route has FocusDirections.check_model)."""
    import focuslens as fl
    from focuslens.engine import FusedModel
    from focuslens.testing import tiny_hf_model, tiny_tokenizer

    fused = fl.FocusLens(FusedModel(tiny_hf_model("llama"), tiny_tokenizer()))
    info = model_info(tiny_llama)
    with fused.steer(_fd(tiny_llama), alpha=0.5) as h:  # this model's directions: applied
        assert h.active
    with pytest.raises(UsageError, match=r"these focus directions were learned on another model .*tiny-gpt2"):
        fused.steer(_fd(tiny_gpt2, heads=((0, 0),)), alpha=0.5)
    wide = fl.FocusDirections(heads=[(7, 0)], vectors=torch.randn(1, info.d_head),
                              fingerprint={**info.fingerprint(), "n_layers": 8}, model_name="deeper", site="hook_rot_q")
    with pytest.raises(UsageError, match=r"n_layers=8 there, 2 here"):
        fused.steer(wide, alpha=0.5)


# --------------------------------------------------------------------------------------------------
# 11. leftovers of the second pass (issue #34): the last silent numbers, raw errors and engine overflows
# --------------------------------------------------------------------------------------------------


def test_focus_directions_refuse_non_finite_vectors_float_heads_and_bool_factors(tiny_llama):
    """FocusDirections took NaN/inf vectors and float heads at construction, ``d * True`` / ``d * nan`` as
    factors, and ``d.apply(heads=True)`` failed with a raw TypeError."""
    from focuslens.directions import FocusDirections

    info = model_info(tiny_llama)
    fp = info.fingerprint()
    for bad in (float("nan"), float("inf")):
        v = torch.ones(2, info.d_head)
        v[1, 3] = bad
        with pytest.raises(ValueError, match=r"FocusDirections: the vector for \(1, 2\) contains NaN or inf"):
            FocusDirections(heads=[(0, 0), (1, 2)], vectors=v, fingerprint=fp)
    for heads, needle in (([(0.0, 1)], "got (0.0, 1)"), ([(True, 1)], "got (True, 1)"), ([(0, 1), (0, 1)], "twice")):
        with pytest.raises(ValueError, match=re.escape(needle)):
            FocusDirections(heads=heads, vectors=torch.ones(len(heads), info.d_head), fingerprint=fp)
    with pytest.raises(ValueError, match="alpha must be a real number, got True"):
        FocusDirections(heads=[(0, 0)], vectors=torch.ones(1, info.d_head), fingerprint=fp, alpha=True)
    d = _fd(tiny_llama)
    refused = [
        (lambda: d * True, "the factor must be a real number, got True"),
        (lambda: True * d, "the factor must be a real number, got True"),
        (lambda: d * float("nan"), "the factor must be finite, got nan"),
        (lambda: d * float("inf"), "the factor must be finite"),
        (lambda: d * 1e39, "is not finite in float32 (alpha = 1e+39"),
        (lambda: d / 0, "the divisor is 0"),
        (lambda: d / False, "the divisor must be a real number, got False"),
        (lambda: d.top(True), "k must be an int in 1..2, got True"),
        (lambda: d.scaled([1.0, float("nan")]), "factors must be finite real numbers"),
        (lambda: d.apply(tiny_llama, heads=True), "heads must be a list of (layer, head) pairs of ints, got True"),
        (lambda: d.apply(tiny_llama, heads=[(0, 0.0)]), "pairs of ints, got (0, 0.0)"),
        (lambda: d.apply(tiny_llama, alpha=1e39), "alpha * vector for (0, 0) is not finite in float32"),
    ]
    for f, needle in refused:
        with pytest.raises(ValueError) as e:
            f()
        assert needle in str(e.value), (needle, str(e.value))
    assert count_hooks(tiny_llama) == 0
    assert torch.equal((d * 2).vectors, d.vectors * 2) and torch.equal((d / 2).vectors, d.vectors / 2)


def test_generation_budgets_are_counts(tiny_llama):
    """``Decoding(max_new_tokens=-1)`` was accepted (and ran), ``greedy_generate(max_new_tokens=True)`` decoded
    one token: bools, floats and non-positive budgets are refused by the one count check (check_count)."""
    import focuslens as fl
    from focuslens.core.generation import greedy_generate, greedy_generate_batch
    from focuslens.evaluation.runner import Decoding
    from focuslens.tasks import make_synthetic_qa

    toks = torch.arange(1, 8)
    for bad in (-1, 0, True, 2.0, "4", None):
        with pytest.raises(ValueError, match=re.escape(f"Decoding: max_new_tokens must be an int in >= 1, got {bad!r}")):
            Decoding(max_new_tokens=bad)
        with pytest.raises(ValueError, match=re.escape(f"greedy_generate: max_new_tokens must be an int in >= 1, "
                                                       f"got {bad!r}")):
            greedy_generate(tiny_llama, toks, max_new_tokens=bad)
        with pytest.raises(ValueError, match=re.escape(f"max_new_tokens must be an int in >= 1, got {bad!r}")):
            greedy_generate_batch(tiny_llama, [toks, toks[:4]], max_new_tokens=bad)
    with pytest.raises(ValueError, match=re.escape("max_new_tokens must be an int in >= 1, got True")):
        Decoding().replace(max_new_tokens=True)
    ex = make_synthetic_qa(1, n_docs=2, seed=4)
    with pytest.raises(ValueError, match=re.escape("evaluate: batch_size must be an int in >= 1, got True")):
        fl.evaluate(tiny_llama, ex, batch_size=True, progress=False)
    with pytest.raises(UsageError, match="decoding must be a focuslens Decoding"):
        fl.evaluate(tiny_llama, ex, decoding={"max_new_tokens": 2}, progress=False)
    assert Decoding(max_new_tokens=3).max_new_tokens == 3


def test_token_inputs_tokenizers_and_training_examples_are_named(tiny_llama, tok):
    """``head_means`` truncated float "tokens", ``build_prompt(None, ...)`` was a raw TypeError and
    ``cache_qk`` on rendered examples a KeyError."""
    from focuslens.core.prompts import build_prompt
    from focuslens.directions.objectives import cache_qk
    from focuslens.heads.patching import ablate_heads, head_means
    from focuslens.tasks import make_synthetic_qa, render

    for mean_over, needle in ((torch.rand(1, 5) * 10, "mean_over must be integer token ids, got dtype float32"),
                              ([[1.5, 2.0, 3.0]], "mean_over must be integer token ids, got dtype float32"),
                              (torch.ones(1, 3, dtype=torch.bool), "got dtype bool"),
                              ("some text", "mean_over must be [pos] or [batch, pos] token ids"),
                              (torch.tensor([[1, 10**6]]), "outside this model's vocabulary")):
        with pytest.raises(UsageError) as e:
            head_means(tiny_llama, [(0, 0)], mean_over)
        assert needle in str(e.value), (needle, str(e.value))
    with pytest.raises(UsageError, match="integer token ids"):
        ablate_heads(tiny_llama, [(0, 0)], mode="mean", mean_over=torch.rand(1, 4))
    assert count_hooks(tiny_llama) == 0
    assert head_means(tiny_llama, [(0, 0)], [torch.arange(1, 6)])[(0, 0)].isfinite().all()
    for tokenizer in (None, "gpt2", 3):
        with pytest.raises(UsageError, match="build_prompt: tokenizer must be a Hugging Face fast tokenizer"):
            build_prompt(tokenizer, [("doc", "The sky is blue.")])
    for parts in (None, 3, "just a string"):
        with pytest.raises(UsageError, match="build_prompt: parts must be a list"):
            build_prompt(tok, parts)
    assert len(build_prompt(tok, [("doc", "The sky is blue.")])) > 0
    ex = make_synthetic_qa(2, n_docs=2, seed=4)
    rendered = [render(e, tiny_llama, chat=False) for e in ex]
    for examples, needle in ((rendered, "examples[0] is a RenderedExample"), (ex, "examples[0] is a TaskExample"),
                             ("abc", "must be a list of DirectionExample")):
        with pytest.raises(TypeError, match=re.escape(needle)):
            cache_qk(tiny_llama, examples, [(0, 0)])
    with pytest.raises(UsageError, match="cache_qk: examples is empty"):
        cache_qk(tiny_llama, [], [(0, 0)])


def test_deeply_nested_json_is_named_by_every_reader(tiny_llama, tmp_path):
    """The records reader, the training checkpoint and the demo's cached steps let a RecursionError out of
    deeply nested JSON (the other readers named the file): all now read JSON through core.checks.parse_json."""
    from focuslens.demo import DemoConfig, _Steps
    from focuslens.directions.checkpoint import CHECKPOINT_JSON, _Checkpoint

    deep = "[" * 200_000 + "]" * 200_000
    out = tmp_path / "r.jsonl"
    _records_run(tiny_llama, out)
    good = out.read_text()
    out.write_text(good + deep + "\n")
    with pytest.raises(UsageError, match=r"r\.jsonl:4: the JSON is nested too deeply.*truncated or damaged"):
        _records_run(tiny_llama, out)
    out.write_text(good + deep)  # a torn (unterminated) last line: dropped with a warning, as any torn line
    with pytest.warns(UserWarning, match=r"r\.jsonl:4: the last line is incomplete"):
        _records_run(tiny_llama, out)
    out.write_text(deep + "\n" + good)
    for resume in (True, False):
        with pytest.raises(UsageError, match=r"r\.jsonl is not a focuslens records file .* left untouched"):
            _records_run(tiny_llama, out, resume=resume)
    assert out.read_text() == deep + "\n" + good
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / CHECKPOINT_JSON).write_text(deep)
    with pytest.raises(UsageError, match=r"checkpoint\.json: the JSON is nested too deeply.*train afresh"):
        _Checkpoint(ck, {"run": 1}).load((2, 16))
    steps = _Steps(tmp_path / "demo", DemoConfig())
    (steps.dir / "rank.json").write_text(deep)
    with pytest.raises(UsageError, match=r"rank\.json: the JSON is nested too deeply.*delete .*rank\.json"):
        steps.run("rank", lambda: {"never": "run"})


def test_both_engines_refuse_the_same_overflows(tiny_llama):
    """``evaluate --directions D --alpha 1e39`` finished with empty answers on the fused engine (α·u is inf)
    and a q·k overflow gave garbage, while the bridge refused both: the engine now applies the same
    check_scaled and checks the edited heads' queries and attention outputs with the bridge's message."""
    import focuslens as fl
    from focuslens.directions import FocusDirections
    from focuslens.tasks import make_synthetic_qa

    info = model_info(tiny_llama)
    ex = make_synthetic_qa(2, n_docs=2, seed=4)

    def refusal(spec, engine):
        with pytest.raises(ValueError) as e:  # UsageError on a pass; check_scaled's ValueError before it
            fl.evaluate(tiny_llama, ex, intervene=spec, engine=engine, progress=False, max_new_tokens=3)
        assert count_hooks(tiny_llama) == 0
        return str(e.value)

    with pytest.raises(ValueError, match=r"Steer: alpha \* vector for \(0, 0\) is not finite in float32"):
        fl.Steer(_fd(tiny_llama), alpha=1e39)  # refused before any engine is chosen
    d = FocusDirections(heads=[(0, 0), (1, 2)], vectors=torch.full((2, info.d_head), 1e38),
                        fingerprint=info.fingerprint(), model_name=info.name, site="hook_rot_q")
    vecs = {(0, 1): torch.full((info.d_head,), 3e38)}
    for spec in (fl.Steer(d, alpha=3.0), fl.InjectVectors(vecs, alpha=1.0)):  # α·u finite, q·k overflows
        fused, eager = refusal(spec, "fused"), refusal(spec, "eager")
        assert fused == eager, (fused, eager)
        assert "non-finite on this forward pass" in fused and "use a smaller alpha" in fused
    big = fl.InjectVectors({(0, 1): torch.full((info.d_head,), 1e38)}, alpha=10.0)  # α·u itself overflows
    fused, eager = refusal(big, "fused"), refusal(big, "eager")
    assert fused == eager and "alpha * vector for (0, 1) is not finite in float32 (alpha = 10" in fused, fused
    ok = fl.Steer(_fd(tiny_llama), alpha=0.5)  # a normal strength still runs the same on both engines
    runs = [fl.evaluate(tiny_llama, ex, intervene=ok, engine=e, progress=False, max_new_tokens=3) for e in ("fused",
                                                                                                          "eager")]
    assert [r["prediction"] for r in runs[0].records] == [r["prediction"] for r in runs[1].records]


def test_public_api_of_this_session_refuses_bad_values(tiny_llama, tmp_path, monkeypatch):
    """Found by a hunt over the API added this session: each was silent (NaN logits, a bool taken as 1,
    torch's device error) or a raw error (struct.error from a truncated GGUF, AttributeError, IndexError)."""
    import focuslens as fl
    from focuslens.heads.patching import logit_diff_metric
    from focuslens.intervene.label_free import Temperature
    from focuslens.testing import tiny_hf_model, tiny_tokenizer

    toks = torch.arange(1, 10)[None]
    with Temperature([(0, 0), (1, 2)], factor=1e300).attach(tiny_llama):  # logits x 1e300: NaN pattern before
        with pytest.raises(UsageError, match=r"Temperature \(factor = 1e\+300, fixed\) made the attention logits of "
                                             r"heads \[0\] of layer 0 non-finite"):
            tiny_llama(toks)
    assert count_hooks(tiny_llama) == 0
    with Temperature([(0, 0)], factor=3.0).attach(tiny_llama):
        assert torch.isfinite(tiny_llama(toks)).all()
    d_head = model_info(tiny_llama).d_head
    iv = fl.InjectVectors({(0, 1): torch.ones(d_head)}, alpha=1.0)
    refused = [
        (lambda: iv.scaled(True), "InjectVectors.scaled: scale must be a real number, got True"),
        (lambda: fl.Steer(_fd(tiny_llama), alpha=0.5).scaled(True), "Steer.scaled: scale must be a real number"),
        (lambda: iv / 0, "InjectVectors / c: the divisor is 0"),
        (lambda: logit_diff_metric(tiny_llama, 1, 2, pos=True), "pos must be an int position (-1: the last), got True"),
        (lambda: logit_diff_metric(tiny_llama, 1, 2, pos=1.5), "pos must be an int position"),
        (lambda: logit_diff_metric(tiny_llama, 10**6, 2), "good token id 1000000 is outside this model's vocabulary"),
        (lambda: logit_diff_metric(None, 1, 2), "logit_diff_metric needs a hooked model with its tokenizer"),
        (lambda: logit_diff_metric(tiny_llama, 1, 2, pos=100)(tiny_llama(toks)),
         "LogitDiff reads position 100, but the logits have 9 positions"),
    ]
    hf, tk = tiny_hf_model("llama"), tiny_tokenizer()
    refused += [
        (lambda: fl.load_model(hf, tokenizer=tk, device="banana", verbose=False),
         "load_model: device 'banana' is not a torch device"),
        (lambda: fl.load_model(hf, tokenizer="gpt2", verbose=False),
         "tokenizer must be the model's Hugging Face tokenizer object"),
        (lambda: fl.load_model(torch.nn.Linear(2, 2), tokenizer=tk, verbose=False),
         "takes an in-memory Hugging Face causal LM"),
    ]
    if not torch.cuda.is_available():
        refused.append((lambda: fl.load_model(hf, tokenizer=tk, device="cuda", verbose=False),
                        "load_model: device cuda: this torch sees no CUDA GPU"))
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    refused.append((lambda: fl.load_model(fifo, verbose=False), "pipe.gguf is a named pipe (FIFO)"))
    if __import__("importlib.util").util.find_spec("gguf") is not None:
        monkeypatch.setenv("FOCUSLENS_CACHE", str(tmp_path / "cache"))
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(b"GGUF\x03\x00\x00\x00garbage")  # the magic bytes, then a truncated header
        refused.append((lambda: fl.load_model(cut, verbose=False), "the file may be truncated or damaged"))
    for f, needle in refused:
        with pytest.raises(ValueError) as e:
            f()
        assert needle in str(e.value), (needle, str(e.value))
    assert count_hooks(tiny_llama) == 0


def test_plain_id_lists_and_checks_are_usage_errors(tiny_llama):
    """A Python list of ids was a raw AttributeError in greedy_generate; core.checks raised plain ValueError."""
    from focuslens.core.checks import check_count, positive
    from focuslens.core.errors import UsageError
    from focuslens.core.generation import greedy_generate, greedy_generate_batch

    with pytest.raises(UsageError, match=r"torch\.tensor\(ids\)"):
        greedy_generate(tiny_llama, [1, 2, 3], max_new_tokens=2)
    with pytest.raises(UsageError, match=r"torch\.tensor\(ids\)"):
        greedy_generate_batch(tiny_llama, [[1, 2, 3], [4, 5]], max_new_tokens=2)
    with pytest.raises(UsageError, match="max_new_tokens"):
        check_count(True, name="max_new_tokens", what="f")
    with pytest.raises(UsageError, match="tau"):
        positive(float("nan"), name="tau", what="f")
