"""Figures: where the heads sit (a ``[layer, head]`` heatmap), how a metric moves (curves), what one
prompt looks like to the top heads (heads × documents), in **one visual style**.

One style: every condition has one colour everywhere (:data:`CONDITION_COLORS`: unmodified, gold-only,
negative, split softmax, random heads, focus directions, random directions, magnitude control, zero and
mean ablation); variants of a condition (τ, k, objective) keep its colour and change the dash and
marker. :func:`curves` puts n and the mean ± SE into every legend entry and says in the title that the
error bars are ± 1 SE, so a figure read alone carries its sample sizes.

All functions return a plotly ``go.Figure`` so they show in notebooks, and :func:`save_figure` writes
them to disk: HTML always (no browser needed), PNG through kaleido when a Chromium browser is
available. A missing browser is a warning with the fix, never a crash: static export is a
convenience, the HTML carries the same figure.

Example:
    >>> fig = head_heatmap(scores.relevant, title="Contextual scores", top_k=20)
    >>> save_figure(fig, "figures/contextual_heads")   # .html (+ .png with chromium)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.checks import is_index
from ..core.models import HookedModel, ModelInfo
from ..score.ranking import DatasetScores, check_scores
from ..core.io import atomic_write

__all__ = ["head_heatmap", "finder_heatmaps", "ablation_curve", "curves", "head_doc_view", "Series", "Baseline", "Condition",
           "CONDITION_COLORS", "CONDITION_LABELS", "condition_style", "save_figure", "notebook_figures",
           "PNG_HELP"]

Condition = Literal["unmodified", "gold_only", "negative", "split_softmax", "random_heads", "focus_directions",
                    "random_directions", "magnitude_control", "ablation_zero", "ablation_mean"]

#: One colour per condition, used by every figure of the project (colour-blind-safe where possible).
CONDITION_COLORS: dict[str, str] = {
    "unmodified": "#404040",         # dark grey: the model as it is
    "gold_only": "#1b9e77",          # green: the ceiling (only the relevant document)
    "negative": "#d62728",           # red: the floor (distractors only)
    "split_softmax": "#1f77b4",      # blue: split softmax on the top-k contextual heads
    "random_heads": "#ff7f0e",       # orange: the same edit on k random heads
    "focus_directions": "#7b3294",   # purple: learned focus directions
    "random_directions": "#a6761d",  # brown: random directions of matched norm
    "magnitude_control": "#e7298a",  # magenta: focus directions with alpha="auto"
    "ablation_zero": "#17becf",      # cyan: zero ablation of the top-k heads
    "ablation_mean": "#0b5563",      # dark teal: mean ablation of the top-k heads
}
#: How each condition is named in legends.
CONDITION_LABELS: dict[str, str] = {
    "unmodified": "unmodified", "gold_only": "gold only", "negative": "distractors only (negative)",
    "split_softmax": "split softmax, top-k contextual heads", "random_heads": "k random heads",
    "focus_directions": "focus directions", "random_directions": "random directions, matched norm",
    "magnitude_control": "magnitude control (α = auto)", "ablation_zero": "zero ablation",
    "ablation_mean": "mean ablation",
}
_DASHES = ("solid", "dot", "dashdot", "longdash", "dash")
_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x")
SE_NOTE = "error bars ± 1 SE; n in the legend"

PNG_HELP = (
    "PNG export needs kaleido and a Chromium browser: `pip install \"focuslens[figures]\"` (kaleido >= 1) and "
    "`apt-get update && apt-get install -y chromium` (or `plotly_get_chrome`, online), then restart the "
    "kernel or process; set BROWSER_PATH=$(command -v chromium) if kaleido does not find it. "
    "The HTML file was written."
)


def _as_matrix(scores) -> Tensor:
    if isinstance(scores, DatasetScores):
        scores = scores.mean["relevant"]
    if isinstance(scores, (str, bytes, os.PathLike)) or scores is None:
        raise TypeError(f"head_heatmap needs a [layer, head] matrix (a tensor, an array, nested lists or "
                        f"DatasetScores), got {type(scores).__name__}; for a ranking file use "
                        "DatasetScores.load(path) first.")
    try:
        t = torch.as_tensor(scores, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"head_heatmap needs a [layer, head] matrix of numbers (rows of equal length); got a "
                         f"{type(scores).__name__} that is not one ({' '.join(str(e).split())}).") from None
    if t.dim() != 2:
        raise ValueError(f"head_heatmap needs a [layer, head] matrix, got shape {tuple(t.shape)}.")
    if t.numel() == 0:
        raise ValueError("head_heatmap got an empty matrix.")
    return t


def head_heatmap(
    scores: Float[Tensor, "layer head"],
    *,
    title: str = "",
    top_k: int = 20,
    colorbar_title: str = "score",
    colorscale: str = "Blues",
    zmin: float | None = None,
    zmax: float | None = None,
    height: int | None = None,
    width: int | None = None,
    model: HookedModel | ModelInfo | None = None,
):
    """A heatmap of any ``[layer, head]`` tensor: layer on the y axis (0 at the top), head on x.

    Hover shows layer, head, value and rank (1 = highest). The ``top_k`` highest cells are written
    with their rank (``"1"``, ``"2"``...) and outlined by a marker, so the figure answers "where are
    the top heads?" at a glance; ``top_k=0`` marks nothing.

    Args:
        scores: ``[n_layers, n_heads]`` values (tensor, array or nested list); NaN cells stay blank.
        title: figure title.
        top_k: how many of the highest cells to mark (at most all of them).
        colorbar_title, colorscale, zmin, zmax: colour settings.
        model: the model (or its :class:`~focuslens.core.models.ModelInfo`) the figure is about: the table
            must be its ``[n_layers, n_heads]`` (and a :class:`DatasetScores`' fingerprint its own),
            else :func:`~focuslens.score.ranking.check_scores` refuses it.

    Returns:
        ``plotly.graph_objects.Figure`` with the heatmap as trace 0 and the top-k markers as trace 1.
    """
    import plotly.graph_objects as go

    if model is not None:
        check_scores(scores if isinstance(scores, DatasetScores) else _as_matrix(scores), model,
                     what="the heatmap's scores")
    t = _as_matrix(scores)
    L, H = t.shape
    if not is_index(top_k) or top_k < 0:  # a bool is not a count
        raise ValueError(f"top_k must be a non-negative int, got {top_k!r}.")
    top_k = min(top_k, L * H)  # a small matrix with the default top_k=20: mark every cell
    order, text, custom = _heatmap_ranks(t, top_k)
    z = [[None if v != v else v for v in row] for row in t.tolist()]
    heat = go.Heatmap(
        z=z,
        x=list(range(H)),
        y=list(range(L)),
        text=text,
        texttemplate="%{text}",
        textfont={"size": 9},
        customdata=custom,
        colorscale=colorscale,
        zmin=zmin,
        zmax=zmax,
        colorbar={"title": {"text": colorbar_title}},
        hovertemplate="layer %{y}, head %{x}<br>value %{z:.4f}<br>rank %{customdata}<extra></extra>",
        name="scores",
    )
    top = order[:top_k]
    marks = go.Scatter(
        x=[i % H for i, _ in top],
        y=[i // H for i, _ in top],
        mode="markers",
        marker={"symbol": "square-open", "size": 18, "color": "crimson", "line": {"width": 2}},
        name=f"top {top_k}",
        hoverinfo="skip",
        showlegend=top_k > 0,
    )
    fig = go.Figure([heat, marks])
    fig.update_layout(
        title={"text": title},
        xaxis={"title": {"text": "Head"}, "tickmode": "linear", "dtick": 1 if H <= 40 else None,
               "range": [-0.5, H - 0.5], "showgrid": False, "zeroline": False},
        # layer 0 at the top, as in TransformerLens' imshow of [layer, head] results
        yaxis={"title": {"text": "Layer"}, "range": [L - 0.5, -0.5], "tickmode": "linear",
               "dtick": 1 if L <= 48 else None, "showgrid": False, "zeroline": False},
        height=height or max(400, 22 * L + 160),
        width=width or max(420, 40 * H + 260),
        template="plotly_white",
        legend={"orientation": "h", "y": -0.08},
    )
    return fig


def _heatmap_ranks(t: Tensor, top_k: int) -> tuple[list[tuple[int, float]], list[list[str]], list[list[int]]]:
    """``(finite cells by falling value as (flat index, value), rank labels of the top_k cells, rank per cell
    (-1 for NaN))`` of a ``[layer, head]`` matrix; ties keep the lower flat index first."""
    L, H = t.shape
    finite = [(i, float(v)) for i, v in enumerate(t.flatten().tolist()) if v == v]
    order = sorted(finite, key=lambda x: (-x[1], x[0]))
    rank = [[None] * H for _ in range(L)]
    for r, (i, _) in enumerate(order, start=1):
        rank[i // H][i % H] = r
    text = [[str(rank[l][h]) if rank[l][h] is not None and rank[l][h] <= top_k else "" for h in range(H)]
            for l in range(L)]
    custom = [[rank[l][h] if rank[l][h] is not None else -1 for h in range(H)] for l in range(L)]
    return order, text, custom


def ablation_curve(
    x: Sequence[float],
    series: Mapping[str, tuple[Sequence[float], Sequence[float] | None]],
    *,
    baselines: Mapping[str, float] | None = None,
    xaxis: str = "",
    yaxis: str = "",
    title: str = "",
    log_x: bool = False,
    conditions: Mapping[str, str] | None = None,
):
    """Lines with error bars for several conditions, plus horizontal baseline lines.

    For new figures prefer :func:`curves`, which also writes n and ± SE into the legend.

    Args:
        x: the swept values (k, tau, alpha...).
        series: name -> ``(y, yerr)``; ``yerr`` may be None. Each ``y`` has ``len(x)`` values.
        baselines: name -> constant value drawn as a dashed horizontal line across the plot
            (e.g. ``{"original": 0.20, "gold only": 0.72}``).
        xaxis, yaxis, title: labels.
        log_x: logarithmic x axis.
        conditions: series or baseline name -> a :data:`Condition`, colouring it in the project's
            style (:func:`condition_style`); names not listed get plotly's default colours.

    Returns:
        ``go.Figure``: one scatter trace per series (in order), then one line trace per baseline.
    """
    import plotly.graph_objects as go

    xs = [float(v) for v in x]
    if not xs:
        raise ValueError("ablation_curve needs at least one x value.")
    if not series:
        raise ValueError("ablation_curve needs at least one series.")
    fig = go.Figure()
    for name, pair in series.items():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"series[{name!r}] must be a (y, yerr) pair; use (y, None) without errors.")
        y, err = pair
        y = [float(v) for v in y]
        if len(y) != len(xs):
            raise ValueError(f"series[{name!r}] has {len(y)} values but x has {len(xs)}.")
        err_d = None
        if err is not None:
            e = [float(v) for v in err]
            if len(e) != len(xs):
                raise ValueError(f"series[{name!r}] error bars have {len(e)} values but x has {len(xs)}.")
            err_d = {"type": "data", "array": e, "visible": True}
        style = _style_of(conditions, name)
        fig.add_trace(go.Scatter(x=xs, y=y, error_y=err_d, mode="lines+markers", name=name, **style))
    lo, hi = min(xs), max(xs)
    for name, v in (baselines or {}).items():
        c = _style_of(conditions, name).get("line", {}).get("color")
        fig.add_trace(go.Scatter(x=[lo, hi], y=[float(v), float(v)], mode="lines", name=name,
                                 line={"dash": "dash", "width": 1.5, **({"color": c} if c else {})},
                                 hovertemplate=f"{name}: {float(v):.4g}<extra></extra>"))
    fig.update_layout(title={"text": title}, xaxis={"title": {"text": xaxis}, "type": "log" if log_x else "linear"},
                      yaxis={"title": {"text": yaxis}}, template="plotly_white")
    return fig


def _style_of(conditions: Mapping[str, str] | None, name: str) -> dict:
    if not conditions or name not in conditions:
        return {}
    st = condition_style(conditions[name])
    return {"line": {"color": st["color"], "dash": st["dash"]}, "marker": {"color": st["color"], "symbol": st["symbol"]}}


def condition_style(condition: str, variant: int = 0) -> dict[str, str]:
    """The colour, dash and marker of a condition: ``{"color", "dash", "symbol"}``.

    Args:
        condition: one of :data:`CONDITION_COLORS` (e.g. ``"split_softmax"``).
        variant: 0, 1, 2... for variants of one condition drawn in one figure (τ values, k values,
            objectives): same colour, another dash and marker.
    """
    if condition not in CONDITION_COLORS:
        raise ValueError(f"Unknown condition {condition!r}; use one of {sorted(CONDITION_COLORS)} "
                         "(focuslens.plot.figures.CONDITION_COLORS).")
    if isinstance(variant, bool) or not isinstance(variant, int) or variant < 0:
        raise ValueError(f"variant must be a non-negative int, got {variant!r}.")
    return {"color": CONDITION_COLORS[condition], "dash": _DASHES[variant % len(_DASHES)],
            "symbol": _SYMBOLS[variant % len(_SYMBOLS)]}


@dataclass(frozen=True)
class Series:
    """One line of :func:`curves`: a condition measured at every x.

    Attributes:
        name: legend text (n is appended: ``"... (n=40)"``).
        condition: a :data:`Condition` (sets the colour).
        y: one value per x (NaN: not measured, left as a gap).
        se: ± 1 standard error per x (drawn as error bars), or None.
        n: examples per point: one int for all points or one per x (hover and legend).
        variant: dash/marker index within the condition (e.g. the τ's index).
        markers_only: draw markers without a connecting line (points that are not a curve).
    """

    name: str
    condition: str
    y: Sequence[float]
    se: Sequence[float] | None = None
    n: int | Sequence[int] | None = None
    variant: int = 0
    markers_only: bool = False


@dataclass(frozen=True)
class Baseline:
    """A constant reference of :func:`curves` (horizontal dashed line, its ± SE as a band)."""

    name: str
    condition: str
    value: float
    se: float | None = None
    n: int | None = None


def _n_text(n: int | Sequence[int] | None) -> str:
    if n is None:
        return ""
    if isinstance(n, int):
        return f"n={n}"
    # an unmeasured point (a gap, n = 0) has no sample size: the legend states the n of what is drawn
    ns = sorted({int(v) for v in n if v is not None and int(v) > 0})
    if not ns:
        return ""
    return f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}–{ns[-1]}"


def curves(
    x: Sequence[float],
    series: Sequence[Series],
    *,
    baselines: Sequence[Baseline] = (),
    xaxis: str,
    yaxis: str,
    title: str,
    log_x: bool = False,
    x_ticks: Sequence[str] | None = None,
    marks: Mapping[str, float] | None = None,
    y_range: tuple[float, float] | None = (-0.02, 1.02),
    subtitle: str = "",
):
    """Curves in the project's style: one colour per condition, ± 1 SE error bars, n in every legend.

    Why one function: every figure of the paper (Figure 3 and 4, ablation and position curves) is
    "accuracy of some conditions against a swept value, with baselines"; drawing them all here keeps
    colours, error bars and the statement of n identical across figures.

    Args:
        x: the swept values (k, α, gold position...).
        series: the :class:`Series` to draw, in legend order.
        baselines: :class:`Baseline` values drawn as dashed horizontal lines with a ± SE band; the
            legend entry reads ``"name 0.20 ± 0.06 (n=40)"``.
        xaxis, yaxis: axis titles, with units (required: a figure without them is not readable alone).
        title: the figure title; a second line ``error bars ± 1 SE; n in the legend`` is added.
        log_x: logarithmic x axis.
        x_ticks: tick labels for the x values (same length as ``x``).
        marks: label -> x value of a vertical dotted line (e.g. the validation-chosen α).
        y_range: y axis range (default: an accuracy's 0..1; None: automatic).
        subtitle: details on a second title line (model, data, n), before the error-bar note.

    Returns:
        ``go.Figure``: one trace per series (in order), then per baseline a band and a line.
    """
    import plotly.graph_objects as go

    xs = [float(v) for v in x]
    if not xs:
        raise ValueError("curves needs at least one x value.")
    if not series and not baselines:
        raise ValueError("curves needs at least one series or baseline.")
    if not xaxis or not yaxis:
        raise ValueError("curves needs axis titles with units (xaxis=..., yaxis=...).")
    if x_ticks is not None and len(x_ticks) != len(xs):
        raise ValueError(f"x_ticks has {len(x_ticks)} labels but x has {len(xs)} values.")
    fig = go.Figure()
    for s in series:
        fig.add_trace(_series_trace(s, xs))
    lo, hi = min(xs), max(xs)
    for b in baselines:
        _add_baseline(fig, b, lo, hi)
    for label, xv in (marks or {}).items():
        fig.add_vline(x=float(xv), line={"dash": "dot", "width": 1.5, "color": "#555"},
                      annotation_text=label, annotation_position="top")
    xa: dict = {"title": {"text": xaxis}, "type": "log" if log_x else "linear"}
    if x_ticks is not None:
        xa.update(tickmode="array", tickvals=xs, ticktext=list(x_ticks))
    sub = f"{subtitle} · {SE_NOTE}" if subtitle else SE_NOTE
    fig.update_layout(title={"text": f"{title}<br><sub>{sub}</sub>", "font": {"size": 15}}, xaxis=xa,
                      yaxis={"title": {"text": yaxis}, **({"range": list(y_range)} if y_range else {})},
                      template="plotly_white",
                      legend={"font": {"size": 10}}, width=980, height=560)
    return fig


def _series_trace(s: Series, xs: list[float]):
    """One series of :func:`curves`: its condition's style, ± SE error bars, n in the legend and hover."""
    import plotly.graph_objects as go

    if not isinstance(s, Series):
        raise TypeError(f"curves takes Series objects, got {type(s).__name__}.")
    st = condition_style(s.condition, s.variant)
    y = [float(v) for v in s.y]
    if len(y) != len(xs):
        raise ValueError(f"series {s.name!r} has {len(y)} values but x has {len(xs)}.")
    err = None
    if s.se is not None:
        e = [float(v) for v in s.se]
        if len(e) != len(xs):
            raise ValueError(f"series {s.name!r} has {len(e)} error bars but x has {len(xs)}.")
        err = {"type": "data", "array": e, "visible": True, "thickness": 1.2}
    ns = [s.n] * len(xs) if isinstance(s.n, int) or s.n is None else list(s.n)
    if len(ns) != len(xs):
        raise ValueError(f"series {s.name!r} has {len(ns)} sample sizes but x has {len(xs)}.")
    nt = _n_text(s.n)
    return go.Scatter(
        x=xs, y=y, error_y=err, name=f"{s.name} ({nt})" if nt else s.name,
        mode="markers" if s.markers_only else "lines+markers",
        line={"color": st["color"], "dash": st["dash"], "width": 2},
        marker={"color": st["color"], "symbol": st["symbol"], "size": 8},
        customdata=[[-1 if v is None else v, (err["array"][i] if err else float("nan"))] for i, v in enumerate(ns)],
        hovertemplate=f"{s.name}<br>x %{{x}}<br>%{{y:.3f}} ± %{{customdata[1]:.3f}} (n=%{{customdata[0]}})<extra></extra>",
    )


def _add_baseline(fig, b: Baseline, lo: float, hi: float) -> None:
    """A :class:`Baseline` of :func:`curves`: its ± SE band (when it has one), then its dashed line."""
    import plotly.graph_objects as go

    if not isinstance(b, Baseline):
        raise TypeError(f"curves takes Baseline objects, got {type(b).__name__}.")
    color = condition_style(b.condition)["color"]
    v = float(b.value)
    label = f"{b.name} {v:.2f}" + (f" ± {b.se:.2f}" if b.se is not None else "") + (f" (n={b.n})" if b.n else "")
    if b.se is not None and b.se == b.se:
        fig.add_trace(go.Scatter(x=[lo, hi, hi, lo], y=[v - b.se, v - b.se, v + b.se, v + b.se], fill="toself",
                                 mode="lines", line={"width": 0}, fillcolor=color, opacity=0.12,
                                 hoverinfo="skip", showlegend=False, legendgroup=b.name, name=f"{b.name} ± SE"))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[v, v], mode="lines", name=label, legendgroup=b.name,
                             line={"dash": "dash", "width": 1.5, "color": color},
                             hovertemplate=f"{label}<extra></extra>"))


def head_doc_view(
    before: Float[Tensor, "k doc"],
    *,
    heads: Sequence[Sequence[int]],
    docs: Sequence[str],
    gold: int,
    after: Float[Tensor, "k doc"] | None = None,
    after_label: str = "after",
    title: str,
):
    """A head's view of one prompt: attention mass of each selected head on each document.

    Rows are heads (``L{layer}H{head}``, in the order given: the ranking), columns the documents in
    prompt order; hovering a cell shows the document's title and opening words and the mass. The
    gold document's column is outlined. With ``after`` (the same heads under an intervention), two
    panels share one colour scale so the move of mass toward the gold column is visible.

    Args:
        before: ``[k, n_docs]`` mean attention mass from the answer rows on each document.
        heads: the k ``(layer, head)`` pairs of the rows.
        docs: ``n_docs`` hover texts (title and opening words).
        gold: 0-based position of the gold document.
        after: ``[k, n_docs]`` the same under an intervention, or None.
        after_label: the second panel's title.
        title: the figure title.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    b = _as_matrix(before)
    mats = [b] + ([_as_matrix(after)] if after is not None else [])
    k, n = b.shape
    if any(m.shape != b.shape for m in mats):
        raise ValueError(f"before {tuple(b.shape)} and after {tuple(mats[-1].shape)} must have the same shape.")
    if len(heads) != k:
        raise ValueError(f"heads has {len(heads)} entries but the matrix has {k} rows.")
    if len(docs) != n:
        raise ValueError(f"docs has {len(docs)} texts but the matrix has {n} columns.")
    if not 0 <= int(gold) < n:
        raise ValueError(f"gold={gold} is outside 0..{n - 1}.")
    ylab = [f"L{int(l)}H{int(h)}" for l, h in heads]
    xlab = [f"doc {i + 1}" + (" (gold)" if i == gold else "") for i in range(n)]
    hover = [[docs[j] for j in range(n)] for _ in range(k)]
    zmax = max(float(m.max()) for m in mats)
    titles = ["unmodified"] + ([after_label] if after is not None else [])
    fig = make_subplots(rows=1, cols=len(mats), subplot_titles=titles, shared_yaxes=True, horizontal_spacing=0.04)
    for c, m in enumerate(mats, start=1):
        fig.add_trace(go.Heatmap(
            z=m.tolist(), x=xlab, y=ylab, customdata=hover, zmin=0.0, zmax=zmax, colorscale="Blues",
            showscale=c == len(mats), colorbar={"title": {"text": "attention mass"}},
            hovertemplate="%{y} → %{x}<br>mass %{z:.3f}<br>%{customdata}<extra></extra>", name=titles[c - 1],
        ), row=1, col=c)
        fig.add_shape(type="rect", x0=gold - 0.5, x1=gold + 0.5, y0=-0.5, y1=k - 0.5, xref=f"x{c if c > 1 else ''}",
                      yref="y", line={"color": CONDITION_COLORS["gold_only"], "width": 3})
    fig.update_yaxes(autorange="reversed", title_text="head (ranked)", row=1, col=1)
    fig.update_xaxes(title_text="document (prompt order)")
    fig.update_layout(title={"text": title, "font": {"size": 15}, "y": 0.98, "yanchor": "top"}, margin={"t": 170},
                      template="plotly_white", height=max(460, 26 * k + 260),
                      width=min(1600, 60 * n * len(mats) + 300))
    return fig


def save_figure(fig, path_stem: str | os.PathLike, *, formats: Sequence[str] = ("html", "png"),
                scale: float = 2.0,
                include_plotlyjs: Literal["directory", "cdn"] | bool = "directory") -> list[Path]:
    """Write ``fig`` as ``<path_stem>.html`` (always) and ``.png`` (when kaleido + Chromium work).

    Each file is written to a temporary name and renamed into place, so a reader never sees half a
    file. If PNG export fails (typically: no kaleido, or no Chromium browser), one warning on stderr
    explains the fix (:data:`PNG_HELP`) and the function returns the files it did write.

    The HTML renders **offline**: by default (``include_plotlyjs="directory"``) it loads plotly.js from
    ``plotly.min.js`` beside it, which is written once per folder (~4.8 MB, rewritten when the installed
    plotly ships another plotly.js version), so a folder of figures carries one copy instead of one per
    file. Keep the two files together when copying; ``include_plotlyjs=True`` embeds plotly.js in the
    file (one self-contained ~4.8 MB HTML), ``"cdn"`` loads it from the internet (small, online only).

    Args:
        fig: a plotly figure.
        path_stem: the path without suffix (a ``.html``/``.png`` suffix is dropped).
        formats: among ``"html"``, ``"png"``, ``"svg"``, ``"pdf"``; HTML is always written.
        scale: resolution factor of the static images.
        include_plotlyjs: ``"directory"`` (default), ``True`` or ``"cdn"``, as above.

    Returns:
        The paths written (``plotly.min.js`` not included).

    Example:
        >>> save_figure(head_heatmap(scores), "figures/heads")   # heads.html (+ plotly.min.js, heads.png)
    """
    if include_plotlyjs not in ("directory", "cdn", True):
        raise ValueError(f"include_plotlyjs must be 'directory', 'cdn' or True, got {include_plotlyjs!r}.")
    stem = Path(path_stem)
    if stem.suffix in (".html", ".png"):
        stem = stem.with_suffix("")
    fmts = list(dict.fromkeys(f.lower().lstrip(".") for f in formats))
    bad = [f for f in fmts if f not in ("html", "png", "svg", "pdf")]
    if bad:
        raise ValueError(f"Unknown figure formats {bad}; use html, png, svg or pdf.")
    if "html" not in fmts:
        fmts.insert(0, "html")
    written: list[Path] = []
    for f in fmts:
        path = stem.with_suffix(f".{f}")
        if f == "html":
            if include_plotlyjs == "directory":
                _write_plotlyjs(path.parent)
            atomic_write(path, lambda tmp: fig.write_html(tmp, include_plotlyjs=include_plotlyjs, full_html=True))
            written.append(path)
            continue
        _find_browser()
        try:
            atomic_write(path, lambda tmp: fig.write_image(tmp, format=f, scale=scale))
        except Exception as e:  # kaleido raises several types when no browser is found
            msg = str(e).strip().splitlines()[0].rstrip(" ,.:;") if str(e).strip() else type(e).__name__
            print(f"[focuslens] WARNING: could not write {path}: {msg}. {PNG_HELP}", file=sys.stderr)
            continue
        written.append(path)
    return written


def _write_plotlyjs(folder: Path) -> Path:
    """``folder/plotly.min.js`` for ``include_plotlyjs="directory"``, written atomically when missing or
    when it holds another plotly.js version than the installed plotly's (a figure needs its own)."""
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    js = folder / "plotly.min.js"
    want = f"plotly.js v{get_plotlyjs_version()}"
    if js.is_file():
        with open(js, encoding="utf-8", errors="replace") as fh:
            if want in fh.read(200):
                return js
    atomic_write(js, get_plotlyjs())
    return js


def _find_browser() -> None:
    """Point kaleido at a Chromium browser on PATH (``BROWSER_PATH``) unless one is set already."""
    if not os.environ.get("BROWSER_PATH"):
        import shutil

        found = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                      if shutil.which(b)), None)
        if found:
            os.environ["BROWSER_PATH"] = found


def notebook_figures(static: Literal["auto", "png", "html", "none"] = "auto") -> str:
    """Make plotly figures in this notebook survive a static export: a PNG, or plotly.js embedded.

    Why: plotly's default notebook output is its own MIME type only, which Jupyter draws but GitHub's
    viewer, ``jupyter nbconvert --to html`` and other static exports show as **blank**. Call this once
    at the top of a notebook; every figure then carries, besides the interactive figure:

    * ``"png"``: a PNG image (kaleido and a Chromium browser needed; ``pip install "focuslens[figures]"``
      and ``apt-get install chromium``). Shows on GitHub, in HTML exports, offline. Raises a
      ``RuntimeError`` with the fix when PNG export does not work here.
    * ``"html"``: the figure as HTML with plotly.js embedded once in the notebook (~4.8 MB): an HTML
      export stays interactive offline; GitHub (which strips scripts) still shows nothing.
    * ``"auto"`` (default): ``"png"`` when PNG export works (checked with one tiny export), else
      ``"html"`` with a one-line note on stderr saying how to get PNGs.
    * ``"none"``: plotly's MIME type only (Jupyter draws it; static exports are blank).

    A figure is shown by ``fig.show()`` or as a cell's last value. If kaleido was installed after plotly
    was imported, restart the kernel: plotly checks for kaleido once, at import.

    Args:
        static: ``"auto"``, ``"png"``, ``"html"`` or ``"none"``, as above.

    Returns:
        The plotly renderer that was set (``plotly.io.renderers.default``).

    Example:
        >>> import focuslens as fl
        >>> fl.plot.figures.notebook_figures()   # 'plotly_mimetype+png' where kaleido + Chromium work
    """
    import plotly.graph_objects as go
    import plotly.io as pio

    modes = {"png": "plotly_mimetype+png", "html": "plotly_mimetype+notebook", "none": "plotly_mimetype"}
    if static not in ("auto", *modes):
        raise ValueError(f"static must be 'auto', 'png', 'html' or 'none', got {static!r}.")
    if static in ("auto", "png"):
        _find_browser()
        try:
            go.Figure().to_image(format="png", width=8, height=8)
            why = ""
        except Exception as e:  # kaleido raises several types when it or a browser is missing
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if why and _kaleido_needs_restart():
            why = "kaleido was installed after plotly was imported: restart the kernel"
        if why and static == "png":
            raise RuntimeError(f"notebook_figures(static='png'): PNG export does not work here ({why}). {PNG_HELP}")
        if why:
            print(f"[focuslens] figures: no PNG export ({why}); embedding plotly.js instead, so an HTML export "
                  "shows them (GitHub will not). For PNGs: pip install 'focuslens[figures]' and a Chromium "
                  "browser (docs/figures.md).", file=sys.stderr)
        static = "html" if why else "png"
    pio.renderers.default = modes[static]
    return pio.renderers.default


def _kaleido_needs_restart() -> bool:
    """kaleido is installed but plotly imported before it was (plotly looks for it once, at import)."""
    import importlib.util

    try:
        from plotly.io import _kaleido
    except ImportError:  # pragma: no cover - another plotly layout
        return False
    return getattr(_kaleido, "kaleido", True) is None and importlib.util.find_spec("kaleido") is not None


def finder_heatmaps(results: Mapping[str, Any], *, top_k: int = 20, title: str = "",
                    subtitles: Mapping[str, str] | None = None, model: HookedModel | ModelInfo | None = None):
    """The finders' ``[layer, head]`` heatmaps side by side (one plotly figure, one panel each).

    Each panel is :func:`focuslens.plot.figures.head_heatmap`'s heatmap and top-k markers, with its own
    colour scale (the finders' units differ). With ``model``, every table is checked to be that model's
    (:func:`~focuslens.score.ranking.check_scores`).
    """
    if model is not None:
        for n, r in results.items():
            check_scores(r if isinstance(r, DatasetScores) else _as_matrix(r), model, what=f"finder {n!r}'s scores")
    from plotly.subplots import make_subplots

    names = list(results)
    if not names:
        raise ValueError("finder_heatmaps needs at least one result.")
    subs = [(subtitles or {}).get(n, n) for n in names]
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=subs, horizontal_spacing=0.3 / len(names))
    L = H = 0
    for j, n in enumerate(names, start=1):
        t = _as_matrix(results[n])
        L, H = t.shape
        one = head_heatmap(t, top_k=top_k)
        heat, marks = one.data
        right = fig.layout["xaxis" if j == 1 else f"xaxis{j}"].domain[1]
        heat.colorbar = {"x": right + 0.005, "xanchor": "left", "len": 0.9, "thickness": 10,
                         "title": {"text": ""}}
        marks.showlegend = j == 1
        fig.add_trace(heat, row=1, col=j)
        fig.add_trace(marks, row=1, col=j)
        fig.update_xaxes(title_text="Head", range=[-0.5, H - 0.5], dtick=1 if H <= 20 else None, row=1, col=j)
        fig.update_yaxes(range=[L - 0.5, -0.5], dtick=2 if L > 24 else 1, row=1, col=j,
                         title_text="Layer" if j == 1 else None)
    fig.update_layout(title={"text": title}, template="plotly_white", height=max(450, 20 * L + 180),
                      width=max(600, (26 * H + 170) * len(names)), legend={"orientation": "h", "y": -0.12})
    return fig
