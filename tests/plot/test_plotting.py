"""Figures: snapshot the essentials of fig.to_dict(), never pixels."""

from __future__ import annotations


import pytest
import torch

from focuslens.plot.figures import PNG_HELP, ablation_curve, head_heatmap, save_figure


def _scores():
    # 3 layers x 4 heads, distinct values; best: (2, 1)=0.9, (0, 3)=0.8, (1, 0)=0.7
    s = torch.full((3, 4), 0.05)
    s[2, 1], s[0, 3], s[1, 0] = 0.9, 0.8, 0.7
    s[0, 0] = 0.01
    return s


def test_head_heatmap_essentials():
    fig = head_heatmap(_scores(), title="Contextual heads", top_k=3)
    d = fig.to_dict()
    heat, marks = d["data"]
    assert heat["type"] == "heatmap" and marks["type"] == "scatter"
    assert heat["x"] == [0, 1, 2, 3] and heat["y"] == [0, 1, 2]
    assert heat["z"][2][1] == pytest.approx(0.9) and heat["z"][0][0] == pytest.approx(0.01)
    # rank 1..3 written on the top cells only
    assert heat["text"][2][1] == "1" and heat["text"][0][3] == "2" and heat["text"][1][0] == "3"
    assert sum(bool(t) for row in heat["text"] for t in row) == 3
    # hover has value and rank; customdata holds the rank of every cell
    assert "%{z" in heat["hovertemplate"] and "rank %{customdata}" in heat["hovertemplate"]
    assert heat["customdata"][2][1] == 1 and heat["customdata"][0][0] == 12
    assert list(marks["x"]) == [1, 3, 0] and list(marks["y"]) == [2, 0, 1]
    lay = d["layout"]
    assert lay["title"]["text"] == "Contextual heads"
    assert lay["yaxis"]["title"]["text"] == "Layer" and lay["xaxis"]["title"]["text"] == "Head"
    assert list(lay["yaxis"]["range"]) == [2.5, -0.5] and list(lay["xaxis"]["range"]) == [-0.5, 3.5]


def test_head_heatmap_nan_and_validation():
    s = _scores()
    s[1, 1] = float("nan")
    d = head_heatmap(s, top_k=0).to_dict()
    assert d["data"][0]["z"][1][1] is None
    assert not any(t for row in d["data"][0]["text"] for t in row)
    with pytest.raises(ValueError, match="layer, head"):
        head_heatmap(torch.zeros(3))
    with pytest.raises(ValueError, match="non-negative"):
        head_heatmap(_scores(), top_k=-1)
    assert len(head_heatmap(_scores(), top_k=50).to_dict()["data"][1]["x"]) == 12  # clamped
    # lists work too
    assert head_heatmap([[0.1, 0.2]], top_k=1).to_dict()["data"][0]["text"] == [["", "1"]]


def test_ablation_curve_essentials():
    fig = ablation_curve([1, 5, 20], {"contextual": ([0.2, 0.4, 0.7], [0.05, 0.05, 0.04]),
                                      "random": ([0.2, 0.21, 0.25], None)},
                         baselines={"original": 0.2, "gold only": 0.72}, xaxis="k", yaxis="accuracy",
                         title="Split softmax")
    d = fig.to_dict()
    names = [t["name"] for t in d["data"]]
    assert names == ["contextual", "random", "original", "gold only"]
    assert list(d["data"][0]["error_y"]["array"]) == [0.05, 0.05, 0.04]
    assert d["data"][1].get("error_y") in (None, {})
    assert list(d["data"][3]["y"]) == [0.72, 0.72] and list(d["data"][3]["x"]) == [1.0, 20.0]
    assert d["data"][2]["line"]["dash"] == "dash"
    assert d["layout"]["xaxis"]["title"]["text"] == "k" and d["layout"]["title"]["text"] == "Split softmax"
    with pytest.raises(ValueError, match="has 2 values"):
        ablation_curve([1, 2, 3], {"a": ([1, 2], None)})
    with pytest.raises(ValueError, match="pair"):
        ablation_curve([1], {"a": [1]})


def test_save_figure_html_always(tmp_path):
    fig = head_heatmap(_scores(), top_k=2)
    out = save_figure(fig, tmp_path / "sub" / "heat", formats=("html",))
    assert out == [tmp_path / "sub" / "heat.html"]
    text = out[0].read_text()
    assert "plotly" in text.lower() and "heatmap" in text
    # no temp files left; plotly.js beside the HTML (include_plotlyjs="directory": renders offline)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["heat.html", "plotly.min.js"]


def test_save_figure_png_failure_warns_and_continues(tmp_path, monkeypatch, capsys):
    fig = head_heatmap(_scores(), top_k=2)

    def no_browser(*a, **k):
        raise RuntimeError("Kaleido requires Google Chrome to be installed.")

    monkeypatch.setattr(type(fig), "write_image", no_browser)
    out = save_figure(fig, tmp_path / "heat")
    assert out == [tmp_path / "heat.html"]
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "apt-get install -y chromium" in err and PNG_HELP in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.html", "plotly.min.js"]


def test_save_figure_bad_format(tmp_path):
    with pytest.raises(ValueError, match="Unknown figure formats"):
        save_figure(head_heatmap(_scores()), tmp_path / "x", formats=("jpg",))


def test_notebook_figures_falls_back_without_png_export(monkeypatch):
    import plotly.graph_objects as go
    import plotly.io as pio

    from focuslens.plot.figures import notebook_figures

    before = pio.renderers.default
    try:
        def no_browser(self, *a, **k):
            raise RuntimeError("no chromium")

        monkeypatch.setattr(go.Figure, "to_image", no_browser)
        # no PNG: plotly.js embedded (an HTML export still shows the figure), and a note saying why
        assert notebook_figures() == "plotly_mimetype+notebook" == pio.renderers.default
        with pytest.raises(RuntimeError, match="no chromium"):
            notebook_figures(static="png")
        monkeypatch.setattr(go.Figure, "to_image", lambda self, *a, **k: b"\x89PNG")
        assert notebook_figures() == "plotly_mimetype+png" == pio.renderers.default
        assert notebook_figures("none") == "plotly_mimetype"
        with pytest.raises(ValueError, match="static must be"):
            notebook_figures("pdf")
    finally:
        pio.renderers.default = before


def test_condition_style_one_colour_per_condition():
    from typing import get_args

    from focuslens.plot.figures import CONDITION_COLORS, CONDITION_LABELS, Condition, condition_style

    assert set(get_args(Condition)) == set(CONDITION_COLORS) == set(CONDITION_LABELS)
    assert len(set(CONDITION_COLORS.values())) == len(CONDITION_COLORS)  # no two conditions share a colour
    a, b = condition_style("split_softmax", 0), condition_style("split_softmax", 1)
    assert a["color"] == b["color"] == CONDITION_COLORS["split_softmax"]
    assert a["dash"] != b["dash"] and a["symbol"] != b["symbol"]
    with pytest.raises(ValueError, match="Unknown condition 'split'"):
        condition_style("split")
    with pytest.raises(ValueError, match="non-negative"):
        condition_style("negative", -1)


def test_curves_colours_n_and_se_everywhere():
    from focuslens.plot.figures import CONDITION_COLORS, Baseline, Series, curves

    fig = curves([1, 5, 20], [Series("top-k, τ=0.2", "split_softmax", [0.2, 0.5, 0.9], [0.06, 0.08, 0.05], 40),
                              Series("random, τ=0.2", "random_heads", [0.2, 0.25, 0.3], None, [40, 40, 38], variant=1)],
                 baselines=[Baseline("unmodified", "unmodified", 0.2, 0.063, 40)],
                 xaxis="k (heads)", yaxis="accuracy", title="Split softmax", marks={"chosen": 5})
    d = fig.to_dict()
    top, rnd, band, base = d["data"]
    assert top["name"] == "top-k, τ=0.2 (n=40)" and rnd["name"] == "random, τ=0.2 (n=38–40)"
    assert top["line"]["color"] == CONDITION_COLORS["split_softmax"] and rnd["line"]["color"] == CONDITION_COLORS["random_heads"]
    assert rnd["line"]["dash"] == "dot" and list(top["error_y"]["array"]) == [0.06, 0.08, 0.05]
    assert rnd.get("error_y") in (None, {})
    assert base["name"] == "unmodified 0.20 ± 0.06 (n=40)" and base["line"]["color"] == CONDITION_COLORS["unmodified"]
    assert list(band["y"]) == pytest.approx([0.137, 0.137, 0.263, 0.263]) and band["showlegend"] is False
    assert "± 1 SE" in d["layout"]["title"]["text"] and d["layout"]["xaxis"]["title"]["text"] == "k (heads)"
    assert d["layout"]["shapes"][0]["x0"] == 5  # the marked x
    assert [c[0] for c in rnd["customdata"]] == [40, 40, 38]
    with pytest.raises(ValueError, match="axis titles"):
        curves([1], [Series("a", "unmodified", [0.1])], xaxis="", yaxis="acc", title="t")
    with pytest.raises(ValueError, match="has 1 values but x has 2"):
        curves([1, 2], [Series("a", "unmodified", [0.1])], xaxis="x", yaxis="y", title="t")
    with pytest.raises(ValueError, match="Unknown condition"):
        curves([1], [Series("a", "nonsense", [0.1])], xaxis="x", yaxis="y", title="t")
    with pytest.raises(TypeError, match="Series"):
        curves([1], [("a", [0.1])], xaxis="x", yaxis="y", title="t")


def test_ablation_curve_conditions_colour_series():
    from focuslens.plot.figures import CONDITION_COLORS

    fig = ablation_curve([1, 2], {"top": ([0.1, 0.2], None), "other": ([0.3, 0.3], None)},
                         baselines={"gold": 0.7}, conditions={"top": "split_softmax", "gold": "gold_only"})
    d = fig.to_dict()["data"]
    assert d[0]["line"]["color"] == CONDITION_COLORS["split_softmax"]
    assert "color" not in (d[1].get("line") or {})
    assert d[2]["line"]["color"] == CONDITION_COLORS["gold_only"] and d[2]["line"]["dash"] == "dash"


def test_head_doc_view_hover_gold_and_shared_scale():
    from focuslens.plot.figures import head_doc_view

    before = torch.tensor([[0.1, 0.3, 0.05], [0.2, 0.1, 0.0]])
    after = torch.tensor([[0.0, 0.9, 0.0], [0.05, 0.6, 0.05]])
    fig = head_doc_view(before, after=after, heads=[(3, 1), (0, 2)], docs=["A: one", "B: two", "C: three"], gold=1,
                        title="view")
    d = fig.to_dict()
    h0, h1 = d["data"]
    assert h0["y"] == ["L3H1", "L0H2"] and h0["x"] == ["doc 1", "doc 2 (gold)", "doc 3"]
    assert h0["customdata"][1][2] == "C: three" and "%{customdata}" in h0["hovertemplate"]
    assert h0["zmax"] == h1["zmax"] == pytest.approx(0.9) and h0["zmin"] == 0.0
    assert h1["z"][0][1] == pytest.approx(0.9)
    rects = [s for s in d["layout"]["shapes"] if s["type"] == "rect"]
    assert len(rects) == 2 and all(r["x0"] == 0.5 and r["x1"] == 1.5 for r in rects)
    one = head_doc_view(before, heads=[(3, 1), (0, 2)], docs=["a", "b", "c"], gold=0, title="t").to_dict()
    assert len(one["data"]) == 1
    with pytest.raises(ValueError, match="gold=3"):
        head_doc_view(before, heads=[(3, 1), (0, 2)], docs=["a", "b", "c"], gold=3, title="t")
    with pytest.raises(ValueError, match="heads has 1"):
        head_doc_view(before, heads=[(3, 1)], docs=["a", "b", "c"], gold=0, title="t")
    with pytest.raises(ValueError, match="same shape"):
        head_doc_view(before, after=after[:, :2], heads=[(3, 1), (0, 2)], docs=["a", "b", "c"], gold=0, title="t")
