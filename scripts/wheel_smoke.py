"""Smoke test of an installed focuslens (scripts/check_wheel.sh runs it in a fresh venv, outside the checkout).

What a researcher does in the first minutes: load the default model, score the heads on a prompt of
their own, draw and save the heatmap, patch one corrupted fact. Exits non-zero at the first failure;
prints one line per step with its time.

    python scripts/wheel_smoke.py OUT_DIR [--png]

``--png``: the PNG of the heatmap must be written too (the ``figures`` extra is installed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--png", action="store_true", help="require the PNG (kaleido installed)")
    args = ap.parse_args()
    t0 = time.time()

    def step(msg: str) -> None:
        print(f"[smoke] {msg} ({time.time() - t0:.1f} s)", flush=True)

    import torch

    torch.set_num_threads(1)
    import focuslens as fl
    from focuslens.plot.figures import save_figure

    assert "site-packages" in fl.__file__, f"focuslens imported from {fl.__file__}, not an installed wheel"
    step(f"imported focuslens {fl.__version__} from {Path(fl.__file__).parent}")

    model = fl.load_model()
    lens = fl.FocusLens(model)
    step(f"loaded {lens!r}")

    tok = lens.tokenizer
    docs = {"doc_1": "Ann lives in Rome.", "doc_2": "Bob lives in Oslo.", "doc_3": "Cid lives in Lima."}
    parts: list = []
    for name, text in docs.items():
        parts += [(name, text), "\n"]
    p = fl.build_prompt(tok, [*parts, "Where does Bob live? Answer: Bob lives in"])
    full = p.with_response(tok, " Oslo")
    hs = lens.score(full.tokens, response=full.spans["response"], relevant=full.spans["doc_2"])
    rel = hs.relevant
    n_layers, n_heads = lens.info.n_layers, lens.info.n_heads
    assert tuple(rel.shape) == (n_layers, n_heads), rel.shape
    assert torch.isfinite(rel).all() and (rel >= 0).all() and (rel <= 1 + 1e-5).all(), rel
    step(f"scored {n_layers}×{n_heads} heads; top head {lens.heads(1, scores=rel)[0]}, score {rel.max():.3f}")
    print(f"[smoke] score repr: {hs!r}")

    fig = fl.head_heatmap(rel, title="smoke test", top_k=5)
    written = save_figure(fig, args.out / "heatmap")
    names = sorted(w.suffix for w in written)
    html = (args.out / "heatmap.html").read_text()
    assert "<script" in html and "cdn.plot.ly" not in html, "the saved HTML must carry plotly.js (offline)"
    if args.png:
        assert ".png" in names and (args.out / "heatmap.png").stat().st_size > 1000, written
    step(f"saved the heatmap as {', '.join(names)}")

    # patching: the prompt with another city in Bob's document is the corrupted run
    corrupt = fl.build_prompt(tok, [*parts[:2], ("doc_2", "Bob lives in Rome."), *parts[3:],
                                    "Where does Bob live? Answer: Bob lives in"])
    clean_ids, corrupt_ids = p.tokens[None], corrupt.tokens[None]
    assert clean_ids.shape == corrupt_ids.shape, (clean_ids.shape, corrupt_ids.shape)
    oslo, rome = tok.encode(" Oslo", add_special_tokens=False)[0], tok.encode(" Rome", add_special_tokens=False)[0]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, oslo] - logits[:, -1, rome]).mean()

    layers = [0, n_layers // 2, n_layers - 1]
    res = lens.patch(corrupt_ids, clean_ids, metric, layers=layers)
    assert tuple(res.shape) == (n_layers, n_heads), res.shape
    assert torch.isfinite(res[layers]).all() and torch.isnan(res[1]).all(), res
    step(f"patched {len(layers) * n_heads} heads; largest effect {res[layers].abs().max():.3f}")
    step("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
