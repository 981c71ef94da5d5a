"""Figures: snapshot the essentials of fig.to_dict(), never pixels."""

from __future__ import annotations


import pytest
import torch

from focuslens.plotting import PNG_HELP, ablation_curve, head_heatmap, save_figure


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
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["heat.html"]  # no temp files left


def test_save_figure_png_failure_warns_and_continues(tmp_path, monkeypatch, capsys):
    fig = head_heatmap(_scores(), top_k=2)

    def no_browser(*a, **k):
        raise RuntimeError("Kaleido requires Google Chrome to be installed.")

    monkeypatch.setattr(type(fig), "write_image", no_browser)
    out = save_figure(fig, tmp_path / "heat")
    assert out == [tmp_path / "heat.html"]
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "apt-get install -y chromium" in err and PNG_HELP in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.html"]


def test_save_figure_bad_format(tmp_path):
    with pytest.raises(ValueError, match="Unknown figure formats"):
        save_figure(head_heatmap(_scores()), tmp_path / "x", formats=("jpg",))


def test_notebook_figures_falls_back_without_png_export(monkeypatch):
    import plotly.graph_objects as go
    import plotly.io as pio

    from focuslens.plotting import notebook_figures

    before = pio.renderers.default
    try:
        def no_browser(self, *a, **k):
            raise RuntimeError("no chromium")

        monkeypatch.setattr(go.Figure, "to_image", no_browser)
        assert notebook_figures() == "plotly_mimetype" == pio.renderers.default
        monkeypatch.setattr(go.Figure, "to_image", lambda self, *a, **k: b"\x89PNG")
        assert notebook_figures() == "plotly_mimetype+png" == pio.renderers.default
    finally:
        pio.renderers.default = before
