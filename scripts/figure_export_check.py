"""What a notebook figure looks like after a static export, per plotly renderer (docs/figures.md).

Executes a two-cell notebook (a figure as the cell's value, then ``fig.show()``) under each renderer with
nbclient, converts it with nbconvert's HTML exporter and reports the MIME types each output carries,
how many PNG images (``<img>`` tags) the HTML shows and whether plotly.js is embedded. Needs nbconvert (``pip install nbconvert``; not a focuslens dependency) and a python3 kernel.

    python scripts/figure_export_check.py plotly_mimetype+png plotly_mimetype+notebook plotly_mimetype
"""

from __future__ import annotations

import re
import sys

IMG = re.compile(r'<img[^>]*src="data:image/png')


def main(renderers: list[str]) -> None:
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    for r in renderers:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(
            "import plotly.graph_objects as go, plotly.io as pio\n"
            f"pio.renderers.default = {r!r}\n"
            "fig = go.Figure(go.Heatmap(z=[[1, 2], [3, 4]]))\nfig"),
            nbformat.v4.new_code_cell("fig.show()")]
        NotebookClient(nb, kernel_name="python3", timeout=180).execute()
        mimes = [sorted(o.get("data", {})) for c in nb.cells for o in c.outputs if o.get("data")]
        html, _ = HTMLExporter().from_notebook_node(nb)
        print(f"{r}: outputs {mimes}; HTML export: {len(IMG.findall(html))} PNG image(s), "
              f"plotly.js embedded: {'plotly.js v' in html}, {len(html) / 1e6:.1f} MB")


if __name__ == "__main__":
    main(sys.argv[1:] or ["plotly_mimetype+png", "plotly_mimetype+notebook", "plotly_mimetype"])
