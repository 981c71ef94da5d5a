"""The command line: help texts, one-line errors with non-zero exits, and the demo pipeline end to end
(on a tiny random model so that it runs in seconds; the real demo is run by `focuslens demo`)."""

import json
import subprocess
import sys

import pytest

from focuslens.cli import build_parser, main

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
        (["plot", str(tmp_path / "missing.json")], "no such ranking file"),
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
    for needle in ("Baselines", "Contextual heads", "Split softmax", "Focus directions", "magnitude control"):
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
    from focuslens.directions import FocusDirections

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
