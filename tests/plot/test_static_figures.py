"""Figures that survive where plotly's JavaScript does not run (issue #35): saved HTML that renders
offline, and notebook outputs that carry a PNG (GitHub, nbconvert HTML) or embedded plotly.js."""

from __future__ import annotations

import pytest
import torch

from focuslens.plot.figures import head_heatmap, notebook_figures, save_figure


def _fig():
    return head_heatmap(torch.arange(12, dtype=torch.float32).reshape(3, 4), top_k=2)


def _png_export_works() -> bool:
    import plotly.graph_objects as go

    from focuslens.plot.figures import _find_browser

    _find_browser()
    try:
        go.Figure().to_image(format="png", width=8, height=8)
        return True
    except Exception:
        return False


def test_saved_html_loads_plotlyjs_from_its_folder_not_the_internet(tmp_path):
    from plotly.offline import get_plotlyjs_version

    out = save_figure(_fig(), tmp_path / "a", formats=("html",))
    html = out[0].read_text()
    assert "cdn.plot.ly" not in html and '<script charset="utf-8" src="plotly.min.js">' in html
    js = tmp_path / "plotly.min.js"
    assert f"plotly.js v{get_plotlyjs_version()}" in js.read_text()[:200] and js.stat().st_size > 1_000_000
    stamp = js.stat().st_mtime_ns
    save_figure(_fig(), tmp_path / "b", formats=("html",))
    assert js.stat().st_mtime_ns == stamp  # one copy per folder, written once
    js.write_text("/**\n* plotly.js v0.0.1\n*/")  # another plotly.js version: replaced, the figure needs its own
    save_figure(_fig(), tmp_path / "c", formats=("html",))
    assert f"plotly.js v{get_plotlyjs_version()}" in js.read_text()[:200]


def test_saved_html_can_be_self_contained_or_cdn(tmp_path):
    one = save_figure(_fig(), tmp_path / "one", formats=("html",), include_plotlyjs=True)[0].read_text()
    assert "plotly.min.js" not in one and len(one) > 1_000_000
    assert not (tmp_path / "plotly.min.js").exists()
    cdn = save_figure(_fig(), tmp_path / "cdn", formats=("html",), include_plotlyjs="cdn")[0].read_text()
    assert "cdn.plot.ly" in cdn and len(cdn) < 100_000
    with pytest.raises(ValueError, match="include_plotlyjs"):
        save_figure(_fig(), tmp_path / "x", include_plotlyjs="require")


def _shown(fig) -> dict:
    """The MIME bundle ``fig.show()`` sends to the notebook (what an executed notebook stores)."""
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    InteractiveShell.instance()
    with capture_output() as cap:
        fig.show()
    bundles = [o.data for o in cap.outputs]
    return bundles[-1] if bundles else {}


@pytest.fixture
def renderer():
    import plotly.io as pio

    before = pio.renderers.default
    yield
    pio.renderers.default = before


@pytest.mark.skipif(not _png_export_works(), reason="no kaleido + Chromium here (PNG export)")
def test_notebook_figures_put_a_png_beside_the_interactive_figure(renderer):
    import base64

    assert notebook_figures() == "plotly_mimetype+png"
    bundle = _shown(_fig())
    # Jupyter draws the plotly MIME type; GitHub and nbconvert's HTML pick the PNG (no text/html to prefer)
    assert "application/vnd.plotly.v1+json" in bundle and "text/html" not in bundle
    assert base64.b64decode(bundle["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_png_export_figures_carry_html(renderer, monkeypatch, capsys):
    import plotly.graph_objects as go

    def no_browser(self, *a, **k):
        raise RuntimeError("Kaleido requires Google Chrome to be installed.")

    monkeypatch.setattr(go.Figure, "to_image", no_browser)
    assert notebook_figures() == "plotly_mimetype+notebook"
    assert "pip install 'focuslens[figures]'" in capsys.readouterr().err
    bundle = _shown(_fig())
    assert "text/html" in bundle and "application/vnd.plotly.v1+json" in bundle
