"""Real-document train / validation / test sets from the NQ-open oracle file (issue 19, part 1).

One command writes every set the real-distraction experiments use, deterministically:

    python experiments/real_documents.py                       # ≈ 2–3 min on this CPU
    python experiments/real_documents.py --n-docs 10 --kinds random   # a subset

What it writes (``--out``, default ``runs/real_documents/``; not tracked: the files are a pure function
of the oracle file and the settings below, so they are regenerated rather than committed):

* ``nq-{kind}{N}-{split}.jsonl.gz`` for N ∈ ``--n-docs`` (10, 20), kind ∈ ``--kinds`` (``random``:
  uniform among eligible passages; ``hard``: TF-IDF nearest to the question), split ∈ train /
  validation / test; the gold passage cycles over positions (question i of a split at i mod N);
* ``nq-{kind}{N}-test-every.jsonl.gz``: each test question at **every** gold position (the
  lost-in-the-middle curve, paired across positions);
* ``manifest.json``: the source file's sha256, the settings, and per file its count and sha256 — the
  identity any experiment that reads these sets records (a changed file never passes for the old one).

Rules (``focuslens.tasks.real_document_splits``): questions are split by a hash of their normalised
text (60 / 20 / 20 by default), and each split draws its distractors from **its own** questions' gold
passages only, never one that contains the question's answer — no test question, passage or answer is
seen in training. Readable with ``focuslens.tasks.load_litm`` (and the LitM code: extra keys are ignored).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from focuslens.core.io import atomic_write_json  # noqa: E402
from focuslens.tasks import SPLITS, load_litm, real_document_splits, save_litm  # noqa: E402

NQ_ORACLE = ROOT.parent / "shared" / "data" / "litm" / "nq-open-oracle.jsonl.gz"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--oracle", type=Path, default=NQ_ORACLE, help="nq-open-oracle.jsonl.gz (default: ../shared/data/litm/)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "real_documents")
    ap.add_argument("--n-docs", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--kinds", nargs="+", default=["random", "hard"], choices=["random", "hard"])
    ap.add_argument("--fractions", type=float, nargs=3, default=[0.6, 0.2, 0.2], metavar=("TRAIN", "VAL", "TEST"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.oracle.is_file():
        print(f"error: oracle file not found: {args.oracle} (pass --oracle PATH to nq-open-oracle.jsonl.gz)",
              file=sys.stderr)
        return 2
    oracle = load_litm(args.oracle)
    settings = {"fractions": list(args.fractions), "seed": args.seed}
    manifest = {"source": {"path": str(args.oracle.name), "sha256": sha256_file(args.oracle), "records": len(oracle)},
                "settings": settings, "rule": "focuslens.tasks.real_document_splits", "files": {}}
    for n in args.n_docs:
        for kind in args.kinds:
            for positions in ("cycle", "every"):
                t0 = time.time()
                sets = real_document_splits(oracle, n_docs=n, distractors=kind, positions=positions,
                                            fractions=args.fractions, seed=args.seed,
                                            splits=SPLITS if positions == "cycle" else ("test",))
                for split in sets:
                    name = f"nq-{kind}{n}-{split}" + ("-every" if positions == "every" else "") + ".jsonl.gz"
                    path = save_litm(sets[split], args.out / name)
                    manifest["files"][name] = {"n_docs": n, "distractors": kind, "split": split, "positions": positions,
                                               "examples": len(sets[split]),
                                               "questions": len({e.question for e in sets[split]}),
                                               "sha256": sha256_file(path)}
                    print(f"[real_documents] {name}: {len(sets[split])} examples ({time.time() - t0:.0f} s)", flush=True)
    atomic_write_json(args.out / "manifest.json", manifest)
    print(f"[real_documents] wrote {len(manifest['files'])} files and manifest.json to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
