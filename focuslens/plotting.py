"""Figures: where the heads sit (a ``[layer, head]`` heatmap) and how a metric moves (ablation curves).

Both return a plotly ``go.Figure`` so they show in notebooks, and :func:`save_figure` writes them to
disk: HTML always (no browser needed), PNG through kaleido when a Chromium browser is available. A
missing browser is a warning with the fix, never a crash: static export is a convenience, the HTML
carries the same figure.

Example:
    >>> fig = head_heatmap(scores.relevant, title="Contextual scores", top_k=20)
    >>> save_figure(fig, "figures/contextual_heads")   # .html (+ .png with chromium)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .io import atomic_write

__all__ = ["head_heatmap", "ablation_curve", "save_figure", "notebook_figures", "PNG_HELP"]

PNG_HELP = (
    "PNG export needs kaleido and a Chromium browser. Install one with "
    "`apt-get update && apt-get install -y chromium` (or `plotly_get_chrome`), and set "
    "BROWSER_PATH=$(command -v chromium) if kaleido does not find it. The HTML file was written."
)


def _as_matrix(scores) -> Tensor:
    t = torch.as_tensor(scores, dtype=torch.float32).detach().cpu()
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

    Returns:
        ``plotly.graph_objects.Figure`` with the heatmap as trace 0 and the top-k markers as trace 1.
    """
    import plotly.graph_objects as go

    t = _as_matrix(scores)
    L, H = t.shape
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative int, got {top_k!r}.")
    top_k = min(top_k, L * H)  # a small matrix with the default top_k=20: mark every cell
    flat = t.flatten()
    finite = [(i, float(v)) for i, v in enumerate(flat.tolist()) if v == v]
    order = sorted(finite, key=lambda x: (-x[1], x[0]))
    rank = [[None] * H for _ in range(L)]
    for r, (i, _) in enumerate(order, start=1):
        rank[i // H][i % H] = r
    text = [[str(rank[l][h]) if rank[l][h] is not None and rank[l][h] <= top_k else "" for h in range(H)]
            for l in range(L)]
    custom = [[rank[l][h] if rank[l][h] is not None else -1 for h in range(H)] for l in range(L)]
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


def ablation_curve(
    x: Sequence[float],
    series: Mapping[str, tuple[Sequence[float], Sequence[float] | None]],
    *,
    baselines: Mapping[str, float] | None = None,
    xaxis: str = "",
    yaxis: str = "",
    title: str = "",
    log_x: bool = False,
):
    """Lines with error bars for several conditions, plus horizontal baseline lines.

    Args:
        x: the swept values (k, tau, alpha...).
        series: name -> ``(y, yerr)``; ``yerr`` may be None. Each ``y`` has ``len(x)`` values.
        baselines: name -> constant value drawn as a dashed horizontal line across the plot
            (e.g. ``{"original": 0.20, "gold only": 0.72}``).
        xaxis, yaxis, title: labels.
        log_x: logarithmic x axis.

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
        fig.add_trace(go.Scatter(x=xs, y=y, error_y=err_d, mode="lines+markers", name=name))
    lo, hi = min(xs), max(xs)
    for name, v in (baselines or {}).items():
        fig.add_trace(go.Scatter(x=[lo, hi], y=[float(v), float(v)], mode="lines", name=name,
                                 line={"dash": "dash", "width": 1.5}, hovertemplate=f"{name}: {float(v):.4g}<extra></extra>"))
    fig.update_layout(title={"text": title}, xaxis={"title": {"text": xaxis}, "type": "log" if log_x else "linear"},
                      yaxis={"title": {"text": yaxis}}, template="plotly_white")
    return fig


def save_figure(fig, path_stem: str | os.PathLike, *, formats: Sequence[str] = ("html", "png"),
                scale: float = 2.0, include_plotlyjs: bool | str = "cdn") -> list[Path]:
    """Write ``fig`` as ``<path_stem>.html`` (always) and ``.png`` (when kaleido + Chromium work).

    Each file is written to a temporary name and renamed into place, so a reader never sees half a
    file. If PNG export fails (typically: no Chromium browser), one warning on stderr explains the
    fix (:data:`PNG_HELP`) and the function returns the files it did write. The HTML loads plotly.js
    from its CDN (small files); pass ``include_plotlyjs=True`` to embed it (~3.5 MB) for offline use.

    Returns:
        The paths written.
    """
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
            atomic_write(path, lambda tmp: fig.write_html(tmp, include_plotlyjs=include_plotlyjs, full_html=True))
            written.append(path)
            continue
        _find_browser()
        try:
            atomic_write(path, lambda tmp: fig.write_image(tmp, format=f, scale=scale))
        except Exception as e:  # kaleido raises several types when no browser is found
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"[focuslens] WARNING: could not write {path}: {msg}. {PNG_HELP}", file=sys.stderr)
            continue
        written.append(path)
    return written


def _find_browser() -> None:
    """Point kaleido at a Chromium browser on PATH (``BROWSER_PATH``) unless one is set already."""
    if not os.environ.get("BROWSER_PATH"):
        import shutil

        found = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                      if shutil.which(b)), None)
        if found:
            os.environ["BROWSER_PATH"] = found


def notebook_figures() -> str:
    """Show plotly figures in notebooks interactively *and* as a static PNG, when PNG export works.

    Why: a notebook committed with outputs should show its figures where plotly's JavaScript does not
    run (GitHub's viewer, nbviewer without JS, a PDF export). With kaleido and a Chromium browser each
    figure is also embedded as a PNG; without them (the check costs one tiny export) figures stay
    interactive only and nothing fails. Returns the plotly renderer that was set.
    """
    import plotly.graph_objects as go
    import plotly.io as pio

    _find_browser()
    try:
        go.Figure().to_image(format="png", width=8, height=8)
        pio.renderers.default = "plotly_mimetype+png"
    except Exception:  # kaleido raises several types when no browser is found
        pio.renderers.default = "plotly_mimetype"
    return pio.renderers.default

