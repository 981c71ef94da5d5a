"""Cost of the label-free measuring passes on the bridge vs the fused engine, and of a whole example.

    python benchmarks/bench_label_free.py            # SmolLM2, CPU float32, 1 thread; ~2 min

Needs the NQ sets (``python experiments/real_documents.py --n-docs 10 --kinds random``). Prints, for the
first validation question (10 real documents, ~1.4k tokens): CPU seconds of the calibration pass
(batch 2: prompt + dummy) and of the locating pass on the bridge and on the engine, the largest difference
of the calibration weights between them, and the CPU seconds per example of ``evaluate`` (16 new tokens,
batch 4, engine="auto") unmodified, with positional calibration and with the self-located span, over
``--n`` questions. The numbers of ``docs/label_free.md`` and ``docs/speed.md`` ("Engine").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from focuslens.core.models import load_model  # noqa: E402
from focuslens.engine import engine_for  # noqa: E402
from focuslens.evaluation.runner import evaluate  # noqa: E402
from focuslens.intervene import PositionalCalibration, SelfLocatedSpan, SplitSoftmax  # noqa: E402
from focuslens.score.ranking import load_heads  # noqa: E402
from focuslens.tasks import load_litm, render  # noqa: E402


def cpu(fn):
    t = time.process_time()
    out = fn()
    return out, time.process_time() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=3, help="questions for the per-example evaluate cost")
    ap.add_argument("--sets", type=Path, default=ROOT / "runs" / "real_documents")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(None, verbose=False, dtype=torch.float32)
    eng = engine_for(model)
    heads = load_heads(ROOT / "figures" / "contextual_heads.json", k=20, model=model)
    exs = load_litm(a.sets / "nq-random10-validation.jsonl.gz")[: a.n]
    r = render(exs[0], model, chat=True)
    cal = PositionalCalibration(heads, temperature=5e-5)
    loc = SelfLocatedSpan(SplitSoftmax(heads, 0.2))
    w_b, t_cb = cpu(lambda: cal.measure(model, [r]))
    w_e, t_ce = cpu(lambda: cal.measure(model, [r], engine=eng))
    l_b, t_lb = cpu(lambda: loc.locate(model, r))
    l_e, t_le = cpu(lambda: loc.locate(model, r, engine=eng))
    print(f"prompt: {len(r)} tokens, {r.n_docs} documents")
    print(f"calibration pass: bridge {t_cb:.1f} CPU-s, engine {t_ce:.1f} CPU-s; max |Δ weight| "
          f"{(w_b - w_e).abs().max().item():.1e}")
    print(f"locating pass:    bridge {t_lb:.1f} CPU-s, engine {t_le:.1f} CPU-s; same document: {l_b.doc == l_e.doc}")
    for name, spec in (("unmodified", None), ("calibration", cal), ("self-located", loc)):
        _, t = cpu(lambda: evaluate(model, exs, intervene=spec, max_new_tokens=16, progress=False, batch_size=4))
        print(f"evaluate {name:12s} {t / len(exs):.1f} CPU-s per example (n = {len(exs)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
