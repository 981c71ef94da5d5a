"""The command line: help texts, one-line errors with non-zero exits, and the demo pipeline end to end
(on a tiny random model so that it runs in seconds; the real demo is run by `focuslens demo`)."""

import json
import subprocess
import sys

import pytest

from focuslens.cli import main

COMMANDS = ["demo", "score", "sweep", "train", "evaluate", "plot", "info"]


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for c in COMMANDS:
        assert c in text


@pytest.mark.parametrize("cmd", COMMANDS)
def test_each_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: focuslens " + cmd in out and len(out) > 200


def _tiny_folder(tmp_path_factory):
    from focuslens.testing import tiny_hf_model, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny_llama_ckpt")
    tiny_hf_model("llama", seed=3).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return _tiny_folder(tmp_path_factory)


def test_errors_are_one_line_and_nonzero(tmp_path, tiny_folder, capsys):
    cases = [
        (["plot", str(tmp_path / "missing.json")], "no such file"),
        (["info", "--model", str(tmp_path / "nope")], "No such model folder"),
        (["evaluate", "--model", str(tiny_folder), "--n", "2", "--heads", str(tmp_path / "r.json"), "--tau", "0"], "tau"),
        (["sweep", "--model", str(tiny_folder), "--n", "2", "--heads", str(tmp_path / "r.json"), "--taus", "-1"], "tau must be > 0"),
        (["score", "--model", str(tiny_folder), "--data", str(tmp_path / "missing.jsonl.gz")], "no such file"),
        (["evaluate", "--model", str(tiny_folder), "--n", "0"], "--n must be positive"),
    ]
    for argv, msg in cases:
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, argv
        assert msg in err, (argv, err)
        assert len(err.splitlines()) == 1, err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "focuslens.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "focuslens" in out.stdout


def test_score_plot_and_evaluate_on_tiny_model(tmp_path, tiny_folder):
    out = tmp_path / "scores"
    assert main(["score", "--model", str(tiny_folder), "--n", "3", "--n-docs", "3", "--max-new-tokens", "4",
                 "--output", str(out)]) == 0
    ranking = out / "contextual_heads.json"
    assert ranking.exists() and (out / "contextual_heads.html").exists()
    assert main(["plot", str(ranking), "--output", str(tmp_path / "fig" / "heat")]) == 0
    assert (tmp_path / "fig" / "heat.html").exists()
    ev = tmp_path / "ev"
    assert main(["evaluate", "--model", str(tiny_folder), "--n", "2", "--n-docs", "3", "--max-new-tokens", "4",
                 "--heads", str(ranking), "--k", "2", "--tau", "0.5", "--output", str(ev)]) == 0
    rec = list(ev.glob("*.jsonl"))
    assert len(rec) == 1 and len(rec[0].read_text().splitlines()) == 3  # header + 2 records


def test_demo_pipeline_end_to_end_and_resumes(tmp_path, tiny_folder, capsys):
    from focuslens.demo import DemoConfig, run_demo

    cfg = DemoConfig(model=str(tiny_folder), n_docs=3, n_rank=2, n_train=3, n_val=2, n_test=2, ks=(1, 2), random_ks=(2,),
                     taus=(0.5,), random_seeds=(0,), k_directions=3, alphas=(-0.5, 0.5), objective="attention",
                     max_new_tokens=4)
    res = run_demo(cfg, tmp_path / "demo")
    report = (tmp_path / "demo" / "report.md").read_text()
    for needle in ("Baselines", "Contextual heads", "Split softmax", "Focus directions", "magnitude control",
                   "calibrated per input"):
        assert needle in report
    for fig in ("contextual_heads", "split_softmax_curve", "focus_directions_alpha"):
        assert (tmp_path / "demo" / "figures" / f"{fig}.html").exists()
    assert {"original", "gold_only", "negative"} <= set(res["baselines"])
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["baselines"]["original"]["n"] == 2
    capsys.readouterr()
    run_demo(cfg, tmp_path / "demo")  # a rerun reuses every finished step
    out = capsys.readouterr().out
    assert out.count("done earlier") == 5


def test_train_with_validation_alpha_selection(tmp_path, tiny_folder):

    out = tmp_path / "scores"
    assert main(["score", "--model", str(tiny_folder), "--n", "2", "--n-docs", "3", "--max-new-tokens", "4",
                 "--output", str(out)]) == 0
    fd = tmp_path / "fd"
    assert main(["train", "--model", str(tiny_folder), "--n", "3", "--n-val", "2", "--n-docs", "3",
                 "--max-new-tokens", "4", "--heads", str(out / "contextual_heads.json"), "--k", "3",
                 "--select-alphas", "0.5", "2", "--select-ks", "2", "3", "--output", str(fd)]) == 0
    cfg = json.loads((fd / "config.json").read_text())
    sel = cfg["training"]["alpha_selection"]
    assert len(sel["rows"]) == 4 and sel["k"] in (2, 3) and sel["alpha"] in (0.5, 2.0)
    assert len(cfg["heads"]) == sel["k"] and cfg["alpha"] == sel["alpha"]
    assert len(list((tmp_path / "fd.select").glob("*.jsonl"))) == 5  # baseline + 2 k × 2 α, resumable
    assert main(["train", "--model", str(tiny_folder), "--n", "3", "--n-val", "2", "--n-docs", "3",
                 "--heads", str(out / "contextual_heads.json"), "--select-alphas", "-1",
                 "--output", str(tmp_path / "fd2")]) == 2


# ---- results keyed by content: another ranking / other directions never get the first run's answers ----


def _records(path):
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return lines[0]["config"], [r["prediction"] for r in lines[1:]]


def _eval_args(tiny_folder, out, *extra):
    return ["evaluate", "--model", str(tiny_folder), "--n", "2", "--n-docs", "3", "--max-new-tokens", "4",
            "--output", str(out), *extra]


def test_evaluate_other_heads_into_the_same_output_recompute(tmp_path, tiny_folder):
    a, b = tmp_path / "A.json", tmp_path / "B.json"
    a.write_text(json.dumps([[0, 0], [0, 1], [0, 2]]))
    b.write_text(json.dumps([[1, 3], [1, 2], [1, 1]]))
    ev = tmp_path / "ev"
    assert main(_eval_args(tiny_folder, ev, "--heads", str(a), "--k", "2", "--tau", "0.01")) == 0
    (file_a,) = ev.glob("*.jsonl")
    assert main(_eval_args(tiny_folder, ev, "--heads", str(b), "--k", "2", "--tau", "0.01")) == 0
    files = set(ev.glob("*.jsonl"))
    assert len(files) == 2  # B got its own file, named by content
    (file_b,) = files - {file_a}
    fresh = tmp_path / "fresh"
    assert main(_eval_args(tiny_folder, fresh, "--heads", str(b), "--k", "2", "--tau", "0.01")) == 0
    (file_fresh,) = fresh.glob("*.jsonl")
    cfg_a, pred_a = _records(file_a)
    cfg_b, pred_b = _records(file_b)
    assert file_b.name == file_fresh.name and pred_b == _records(file_fresh)[1]
    assert pred_a != pred_b  # (so "B's answers" is a real check: A's would be different)
    assert cfg_b["intervene"]["heads"] == [[1, 3], [1, 2]] and cfg_a["intervene"]["heads"] == [[0, 0], [0, 1]]
    assert cfg_a["tag"]["source"]["ranking"] != cfg_b["tag"]["source"]["ranking"]
    assert cfg_b["tag"]["data"] == {"data": "synthetic", "n": 2, "offset": 0, "seed": 0, "n_docs": 3}
    # Same ranking content under another --k or --tau, or other data: their own files too.
    assert main(_eval_args(tiny_folder, ev, "--heads", str(b), "--k", "2", "--tau", "0.5")) == 0
    assert main(_eval_args(tiny_folder, ev, "--heads", str(b), "--k", "2", "--tau", "0.01", "--seed", "1")) == 0
    assert len(list(ev.glob("*.jsonl"))) == 4
    # The same command again resumes its own file (nothing new).
    assert main(_eval_args(tiny_folder, ev, "--heads", str(b), "--k", "2", "--tau", "0.01")) == 0
    assert len(list(ev.glob("*.jsonl"))) == 4 and _records(file_b)[1] == pred_b


def _random_directions(tiny_folder, path, seed):
    import torch

    from focuslens.core.attention import query_site
    from focuslens.directions import FocusDirections
    from focuslens.core.models import load_model, model_info

    model = load_model(str(tiny_folder))
    info = model_info(model)
    g = torch.Generator().manual_seed(seed)
    heads = [(0, 1), (1, 2)]
    d = FocusDirections(heads=heads, vectors=torch.randn(len(heads), info.d_head, generator=g) * 4,
                        fingerprint=info.fingerprint(), model_name=info.name, site=query_site(model), alpha=1.0)
    d.save(path)
    return d


def test_evaluate_other_directions_into_the_same_output_recompute(tmp_path, tiny_folder):
    _random_directions(tiny_folder, tmp_path / "fdA", seed=0)
    _random_directions(tiny_folder, tmp_path / "fdB", seed=1)
    ev = tmp_path / "ev"
    assert main(_eval_args(tiny_folder, ev, "--directions", str(tmp_path / "fdA"), "--alpha", "1")) == 0
    (file_a,) = ev.glob("*.jsonl")
    assert main(_eval_args(tiny_folder, ev, "--directions", str(tmp_path / "fdB"), "--alpha", "1")) == 0
    (file_b,) = set(ev.glob("*.jsonl")) - {file_a}
    fresh = tmp_path / "fresh"
    assert main(_eval_args(tiny_folder, fresh, "--directions", str(tmp_path / "fdB"), "--alpha", "1")) == 0
    (file_fresh,) = fresh.glob("*.jsonl")
    cfg_a, pred_a = _records(file_a)
    cfg_b, pred_b = _records(file_b)
    assert pred_b == _records(file_fresh)[1] and file_b.name == file_fresh.name and pred_a != pred_b
    assert cfg_a["intervene"]["kind"] == "steer" and cfg_a["intervene"]["vectors"] != cfg_b["intervene"]["vectors"]
    # Another α (and the magnitude control) on the same directions: own files.
    assert main(_eval_args(tiny_folder, ev, "--directions", str(tmp_path / "fdB"), "--alpha", "0.5")) == 0
    assert main(_eval_args(tiny_folder, ev, "--directions", str(tmp_path / "fdB"), "--alpha", "auto")) == 0
    assert len(list(ev.glob("*.jsonl"))) == 4
    assert main(_eval_args(tiny_folder, ev, "--directions", str(tmp_path / "fdB"), "--alpha", "nan")) == 2


def test_sweep_files_are_named_by_content(tmp_path, tiny_folder):
    a, b = tmp_path / "A.json", tmp_path / "B.json"
    a.write_text(json.dumps([[0, 0], [0, 1], [0, 2]]))
    b.write_text(json.dumps([[1, 3], [1, 2], [1, 1]]))
    out = tmp_path / "sw"
    argv = ["sweep", "--model", str(tiny_folder), "--n", "2", "--n-docs", "3", "--max-new-tokens", "3",
            "--ks", "1,2", "--taus", "0.01", "--output", str(out)]
    assert main(argv + ["--heads", str(a)]) == 0
    first = {p.name for p in out.glob("*.jsonl")}
    assert len(first) == 1 + 2 + 2  # original, top-k, random-k
    res_a = json.loads((out / "sweep.json").read_text())
    assert main(argv + ["--heads", str(b)]) == 0
    second = {p.name for p in out.glob("*.jsonl")}
    new = second - first
    # Only the top-k runs are new: the baseline and the random-heads control do not depend on the ranking.
    assert sorted(n.split("-")[0] for n in new) == ["top1_tau0.01", "top2_tau0.01"]
    fresh = tmp_path / "sw_fresh"
    assert main(argv[:-1] + [str(fresh), "--heads", str(b)]) == 0
    res_b = json.loads((out / "sweep.json").read_text())
    assert res_b == json.loads((fresh / "sweep.json").read_text())
    assert {p.name for p in fresh.glob("*.jsonl")} == second - {n for n in first if n.startswith("top")}
    assert res_a["original"] == res_b["original"]


def test_random_heads_one_convention(tiny_folder):
    import random

    from focuslens.core.models import load_model
    from focuslens.evaluation.sweeps import random_heads

    model = load_model(str(tiny_folder))
    allh = [(l, h) for l in range(2) for h in range(4)]
    assert random_heads(model, 3, seed=0) == random.Random(0).sample(allh, 3) == random_heads((2, 4), 3, seed=0)
    ranked = list(reversed(allh))
    assert random_heads(model, 2, seed=4, pool=ranked, exclude=ranked[:3]) == random.Random(4).sample(ranked[3:], 2)
    with pytest.raises(ValueError, match="outside"):
        random_heads(model, 1, seed=0, pool=[(5, 0)])
    assert random_heads(model, 3, seed=1) != random_heads(model, 3, seed=0)
    ex = random_heads(model, 5, seed=0, exclude=[(0, 0), (1, 1)])
    assert len(set(ex)) == 5 and not {(0, 0), (1, 1)} & set(ex)
    with pytest.raises(ValueError, match="k must be in 1..8"):
        random_heads(model, 9, seed=0)


def test_train_select_files_are_keyed_by_the_directions(tmp_path, tiny_folder):
    out = tmp_path / "scores"
    assert main(["score", "--model", str(tiny_folder), "--n", "2", "--n-docs", "3", "--max-new-tokens", "4",
                 "--output", str(out)]) == 0
    fd = tmp_path / "fd"
    argv = ["train", "--model", str(tiny_folder), "--n", "3", "--n-val", "2", "--n-docs", "3", "--max-new-tokens", "4",
            "--heads", str(out / "contextual_heads.json"), "--select-alphas", "0.5", "--select-ks", "2",
            "--output", str(fd)]
    assert main(argv + ["--k", "3"]) == 0
    sel = tmp_path / "fd.select"
    first = {p.name for p in sel.glob("*.jsonl")}
    assert sorted(n.split("-")[0] for n in first) == ["k2_a0.5", "unmodified"]
    # Another seed (other data, other directions) into the same --output: its own files, never the
    # first run's records (select_alpha's own test isolates "other directions, same data").
    assert main(argv + ["--k", "3", "--seed", "1"]) == 0
    new = {p.name for p in sel.glob("*.jsonl")} - first
    assert sorted(n.split("-")[0] for n in new) == ["k2_a0.5", "unmodified"]

    def steer(names):
        (name,) = [n for n in names if n.startswith("k2_a0.5")]
        return json.loads((sel / name).read_text().splitlines()[0])["config"]["intervene"]

    assert steer(first)["vectors"] != steer(new)["vectors"]
    # The first command again: everything resumed, no new file.
    assert main(argv + ["--k", "3"]) == 0
    assert {p.name for p in sel.glob("*.jsonl")} == first | new


def test_evaluate_engine_flag_same_answers_and_records(tmp_path, tiny_folder):
    """--engine eager (the bridge) and the default (the fused engine) give the same answers; the engine is
    not part of the records' identity, so the second run resumes the first's file (same name, no new lines)."""
    heads = tmp_path / "h.json"
    heads.write_text(json.dumps([[0, 0], [1, 2]]))
    out = tmp_path / "ev"
    spec = ["--heads", str(heads), "--k", "2", "--tau", "0.3"]
    assert main(_eval_args(tiny_folder, out, *spec, "--engine", "eager")) == 0
    (f,) = out.glob("split_softmax*.jsonl")
    eager = [json.loads(x) for x in f.read_text().splitlines()[1:]]
    assert {r["engine"] for r in eager} == {"eager"}
    fresh = tmp_path / "ev2"
    assert main(_eval_args(tiny_folder, fresh, *spec)) == 0
    (g,) = fresh.glob("split_softmax*.jsonl")
    fused = [json.loads(x) for x in g.read_text().splitlines()[1:]]
    assert {r["engine"] for r in fused} == {"fused"}
    assert f.name == g.name
    assert [r["prediction"] for r in fused] == [r["prediction"] for r in eager]


def test_engine_flag_is_checked(capsys):
    assert main(["evaluate", "--engine", "fast"]) == 2
    err = capsys.readouterr().err
    assert "--engine" in err and len(err.strip().splitlines()) == 1


# ---- any local model: a GGUF file as --model; a base model (no chat template) with --no-chat ----


def test_info_loads_a_gguf_file_and_refuses_other_files(tmp_path, monkeypatch, capsys):
    from focuslens.testing import write_tiny_gguf

    monkeypatch.setenv("FOCUSLENS_CACHE", str(tmp_path / "cache"))
    gguf_file = write_tiny_gguf(tmp_path / "tiny.Q8.gguf")
    assert main(["info", "--model", str(gguf_file)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "tiny.Q8" and info["n_layers"] == 2 and info["n_heads"] == 4
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"PK\x03\x04 not a model")
    assert main(["info", "--model", str(junk)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nor a GGUF model file" in err and "config.json" in err
    folder = tmp_path / "only_gguf"
    folder.mkdir()
    (folder / "m.gguf").write_bytes(b"GGUF")
    assert main(["info", "--model", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--model {folder / 'm.gguf'}" in err


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """The tiny Llama with a tokenizer without a chat template (a base model)."""
    import copy

    from transformers import AutoTokenizer

    from focuslens.testing import tiny_hf_model, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny_base_ckpt")
    tiny_hf_model("llama", seed=3).save_pretrained(d)
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = None
    tok.save_pretrained(d)
    assert AutoTokenizer.from_pretrained(d).chat_template is None
    return d


def test_base_model_fails_at_once_without_no_chat_and_runs_with_it(tmp_path, base_folder, capsys):
    out = tmp_path / "ev"
    assert main(_eval_args(base_folder, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no chat template" in err and "pass --no-chat" in err
    assert not list(out.glob("*.jsonl"))  # refused before any work
    assert main(_eval_args(base_folder, out, "--no-chat")) == 0
    (f,) = out.glob("plain_original-*.jsonl")
    config, preds = _records(f)
    assert config["chat"] is False and len(preds) == 2
    assert main(_eval_args(base_folder, out, "--no-chat")) == 0  # resumed: the same file, no new records
    assert list(out.glob("*.jsonl")) == [f] and _records(f) == (config, preds)
    heads = tmp_path / "h.json"
    heads.write_text(json.dumps([[0, 0], [1, 2], [0, 1]]))
    fd = tmp_path / "fd"
    assert main(["train", "--model", str(base_folder), "--n", "2", "--n-val", "2", "--n-docs", "3",
                 "--max-new-tokens", "3", "--heads", str(heads), "--k", "2", "--select-alphas", "0.5",
                 "--no-chat", "--output", str(fd)]) == 0
    assert {json.loads(p.read_text().splitlines()[0])["config"]["chat"] for p in (tmp_path / "fd.select").glob("*.jsonl")} == {False}


def test_no_chat_enters_the_records_identity(tmp_path, tiny_folder):
    """A chat model evaluated with and without its template: two files in one output folder, never one
    run's answers for the other."""
    out = tmp_path / "ev"
    assert main(_eval_args(tiny_folder, out)) == 0
    (chat_file,) = out.glob("*.jsonl")
    assert main(_eval_args(tiny_folder, out, "--no-chat")) == 0
    (plain_file,) = set(out.glob("*.jsonl")) - {chat_file}
    assert _records(chat_file)[0]["chat"] is True and _records(plain_file)[0]["chat"] is False
