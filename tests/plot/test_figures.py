"""experiments/figures.py: every figure command runs end to end on the tiny model (``--quick``) and resumes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def figures(load_script):
    sys.path.insert(0, str(ROOT / "experiments"))  # figures.py imports fig_directions.py beside it
    return load_script("experiments/figures.py")


def _run(figures, cmd, tmp_path, *extra):
    return figures.main([cmd, "--quick", "--run-dir", str(tmp_path / "runs"), "--fig-dir", str(tmp_path / "figs"),
                         "--formats", "html", *extra])


def test_fig3_quick_has_every_condition_and_resumes(figures, tmp_path):
    res = _run(figures, "fig3", tmp_path)
    assert res["ks"] == [1, 2] and res["taus"] == [0.5, 0.2]
    for tau in ("0.5", "0.2"):
        for k in ("1", "2"):
            assert res["top"][tau][k]["n"] == 2
            assert len(res["random"][tau][k]["per_seed"]) == 2  # quick: seeds 0 and 1
    assert set(res["baselines"]) == {"original", "gold_only", "negative"}
    figs = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert "fig3_split_softmax.html" in figs
    saved = json.loads((tmp_path / "runs" / "fig3_split_softmax.json").read_text())
    assert saved["command"].startswith("python experiments/figures.py fig3 --quick")
    # every condition is a content-keyed JSONL; a rerun generates nothing new
    files = sorted((tmp_path / "runs" / "fig3").glob("*.jsonl")) + sorted((tmp_path / "runs" / "baselines").glob("*.jsonl"))
    assert len(files) == 2 * 2 * (1 + 2) + 3  # (τ × k) × (top + 2 random seeds), then the 3 shared baselines
    before = {p: p.read_text() for p in files}
    _run(figures, "fig3", tmp_path)
    assert {p: p.read_text() for p in files} == before
    # the figure: colours by condition, n in the legend
    html = (tmp_path / "figs" / "fig3_split_softmax.html").read_text()
    assert "#1f77b4" in html and "#ff7f0e" in html and "(n=2)" in html
    assert (tmp_path / "figs" / "fig3_split_softmax.plotly.json").exists()
    # --partial draws from finished records only: a point nobody ran has n = 0 and is reported as such
    part = _run(figures, "fig3", tmp_path, "--partial", "--random-seeds", "0", "1", "7")
    assert part["random"]["0.2"]["2"]["n"] == 2 and part["top"]["0.2"]["1"]["n"] == 2
    assert len(part["random"]["0.2"]["2"]["per_seed"]) == 2  # seed 7 has no records: left out of the mean
    assert not list((tmp_path / "runs" / "fig3").glob("random2_seed7*"))  # nothing generated


def test_headview_quick_split_softmax_moves_mass_to_gold(figures, tmp_path):
    res = _run(figures, "headview", tmp_path)
    g = res["gold_position"]
    assert len(res["heads"]) == 2 and len(res["mass_unmodified"]) == 2 and len(res["mass_unmodified"][0]) == 3
    # τ = 0.2 raises each edited head's gold mass π -> π^0.2 (read after the intervention's hook)
    for before, after in zip(res["mass_unmodified"], res["mass_split_softmax"]):
        assert after[g] > before[g]
    assert res["gold_mass_split_softmax"] > res["gold_mass_unmodified"]


def test_ablation_positions_fig4_quick(figures, tmp_path):
    abl = _run(figures, "ablation", tmp_path)
    for v in ("original", "gold_only"):
        for mode in ("zero", "mean"):
            assert set(abl[v][mode]["top"]) == {"1", "2"} and abl[v][mode]["random"]["2"]["n"] == 2
    pos = _run(figures, "positions", tmp_path)
    for nd in ("2", "3"):
        d = pos["by_docs"][nd]
        assert set(d["unmodified"]) == {str(p) for p in range(int(nd))}
        assert set(d) == {"unmodified", "split_softmax", "focus_directions", "attention_mass"}
        assert all(0.0 <= m["mean"] <= 1.0 for m in d["attention_mass"].values())
    f4 = _run(figures, "fig4", tmp_path)
    for obj in ("likelihood", "attention"):
        o = f4["objectives"][obj]
        assert set(o["learned"]["2"]) == {"-0.5", "0.5"} and set(o["random"]["2"]) == {"0.5"}  # random: α > 0 only
        assert o["selection"]["alpha"] == 0.5  # only positive α are chosen
    for stem in ("ablation_curves", "positions", "fig4_focus_directions_alpha"):
        assert (tmp_path / "figs" / f"{stem}.html").exists()
        assert (tmp_path / "runs" / f"{stem}.md").read_text().strip()
    # positions and fig4 share the cached likelihood directions (trained once)
    assert len(list((tmp_path / "runs" / "directions").glob("likelihood-*"))) == 1
    # the saved artefact supersedes its training checkpoint (nothing stale left in the tracked records)
    assert not list((tmp_path / "runs" / "directions").glob("ckpt-*"))


def test_bad_options_are_clear(figures, tmp_path, capsys):
    with pytest.raises(SystemExit):
        figures.main(["nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--n, --chunk and --n-rank must be >= 1"):
        figures.main(["fig3", "--n", "0", "--run-dir", str(tmp_path)])
