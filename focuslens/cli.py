"""The ``focuslens`` command line: the demo, and each step of the method on any model and data file.

    focuslens demo [--full]                 the whole pipeline on the embedded default model
    focuslens score    --output DIR         contextual scores, ranking JSON, head-location heatmap
    focuslens sweep    --heads R.json       split softmax on the top-k heads for k x tau, random control
    focuslens train    --heads R.json       learn focus directions (saved as a folder)
    focuslens evaluate [--directions DIR]   accuracy with/without an intervention
    focuslens plot     R.json               heatmap of a saved ranking
    focuslens info                          the model's architecture

Every command takes ``--model`` (default: the embedded SmolLM2-135M-Instruct; or a GGUF file, a local
Hugging Face folder, or a hub name where the network works), ``--data`` (``synthetic`` or a
Lost-in-the-Middle ``.jsonl(.gz)`` file), ``--seed`` and ``--output``. The commands that render prompts
(score, sweep, train, evaluate) put them in the model's chat template; ``--no-chat`` renders plain text
instead, for a base model without a chat template (such a model is refused without it, right after
loading).

Errors: every argument is validated before the model is loaded; a problem with the input (an
argument, a file, a format, a device, a model, the data) prints one line saying what is wrong and how
to fix it and exits 2; anything else is a bug: one line naming the file that holds the traceback, exit
1 (``--debug`` prints the traceback). Each command holds the output lock of what it writes
(:func:`focuslens.core.io.output_lock`): a second process writing the same output is refused.

Stored evaluations are named by content: ``{name}-{hash}.jsonl``, where the hash covers the
intervention's identity (:mod:`focuslens.intervene.specs`: heads in order and τ, or the directions' checksum and
α), where it came from (the ranking file's checksum and k, the directions' checksum), the data (source
and its checksum, ``--n``, ``--offset``, ``--seed``, ``--n-docs``), the model argument and dtype, and the
decoding settings (``--max-new-tokens``, ``--no-chat``). A rerun of the same command resumes its file;
any other configuration writes its own file and never prints another run's answers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from pickle import UnpicklingError  # the class only: weights are read by torch.load(weights_only=True)

from .core.errors import UsageError, is_expected, one_line, write_traceback
from .cli_checks import require_arg
from .cli_checks import validate as _validate
from .core.generation import DEFAULT_MAX_NEW_TOKENS

__all__ = ["main", "build_parser"]


class _ArgError(Exception):
    """argparse found a bad argument: reported by :func:`main` as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        raise _ArgError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _debug_flag(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="on an error, print the full traceback")


def _engine_flag(p: argparse.ArgumentParser) -> None:
    """``--engine`` for the commands that decode answers under an intervention (sweep, train's α selection, evaluate)."""
    p.add_argument("--engine", default="auto", choices=["auto", "fused", "eager"],
                   help="decoding engine: 'auto' runs on the model's fused (SDPA) attention wherever the "
                        "intervention allows it, else on the TransformerLens bridge; 'eager' forces the bridge; "
                        "'fused' refuses to fall back [auto]")


def _common(p: argparse.ArgumentParser, *, data: bool = True) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="model: omitted = embedded SmolLM2-135M-Instruct; a GGUF file (dequantised once into the "
                        "cache); a local HF checkpoint folder; or a hub name")
    g.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1) [cpu]")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="parameter dtype [float32]")
    if data:
        g.add_argument("--data", default="synthetic",
                       help="'synthetic' (entity-attribute multi-document QA) or a Lost-in-the-Middle .jsonl(.gz) file [synthetic]")
        g.add_argument("--n", type=int, default=100, help="number of examples [100]")
        g.add_argument("--n-docs", type=int, default=10, help="documents per synthetic example [10]")
        g.add_argument("--offset", type=int, default=0,
                       help="skip this many examples first (keep ranking/training/test sets disjoint) [0]")
        g.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                       help=f"greedy generation budget [{DEFAULT_MAX_NEW_TOKENS}]")
        g.add_argument("--no-chat", dest="chat", action="store_false",
                       help="render prompts as plain text, not in the model's chat template (for a base model "
                            "whose tokenizer has no chat template) [chat template]")
    p.add_argument("--seed", type=int, default=0, help="random seed [0]")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads [torch's default: one per core; the demo ran 1.5x faster on 2 cores than on 1]")
    _debug_flag(p)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="focuslens",
        description="Find the attention heads that read the relevant context (contextual heads), test them "
                    "causally with split softmax, and steer them with focus directions.",
        epilog="Run 'focuslens COMMAND --help' for the options of a command.",
    )
    _debug_flag(ap, top=True)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="run the whole pipeline on the default model and task (about 10 minutes)",
                       description="Baselines, contextual scores + heatmap, split-softmax sweep with random-head control, "
                                   "focus-direction training and alpha sweep with magnitude control. Resumable: a rerun "
                                   "reuses finished steps.")
    p.add_argument("--full", action="store_true", help="the larger protocol (hundreds of examples; about an hour)")
    p.add_argument("--output", default="demo_output", help="output folder [demo_output]")
    p.add_argument("--figures", default=None, help="also write the figures into this folder (e.g. figures)")
    p.add_argument("--objective", default="attention", choices=["attention", "likelihood", "both"],
                   help="focus-direction objective: the paper's attention mass on cached q/k (seconds), or the "
                        "end-to-end answer likelihood through the frozen model (slower) [attention]")
    p.add_argument("--n-test", type=int, default=None, help="override the number of test examples per condition")
    _common(p, data=False)

    p = sub.add_parser("score", help="contextual scores of every head, ranking and heatmap",
                       description="Score every head by the attention mass that the response tokens put on the gold "
                                   "document (averaged over examples), rank them and draw the head-location heatmap.")
    _common(p)
    p.add_argument("--response", default="generate", choices=["generate", "gold", "gold_only"],
                   help="response rows: the model's own answer (paper), the gold answer text, or the gold-only answer [generate]")
    p.add_argument("--top-k", type=int, default=20, help="heads to mark [20]")
    p.add_argument("--output", default="focuslens_scores", help="output folder")

    p = sub.add_parser("sweep", help="split softmax on the top-k contextual heads for k x tau, with random heads",
                       description="Accuracy under split softmax (oracle gold span) on the top-k heads of a ranking, "
                                   "for each k and tau, with k random heads as the control; writes a table and the "
                                   "ablation-curve figure.")
    _common(p)
    p.add_argument("--heads", required=True, help="ranking JSON from 'focuslens score' (or the authors' relevant_heads.json)")
    p.add_argument("--ks", type=_ints, default=[5, 20], help="comma-separated k values [5,20]")
    p.add_argument("--taus", type=_floats, default=[0.2, 0.5], help="comma-separated tau values in (0, 1] [0.2,0.5]")
    p.add_argument("--random-seeds", type=_ints, default=[0], help="seeds of the random-head control [0]")
    p.add_argument("--output", default="focuslens_sweep", help="output folder")
    _engine_flag(p)

    p = sub.add_parser("train", help="learn focus directions on the top-k heads",
                       description="Learn one query vector per head (the paper's attention objective on cached q/k, or "
                                   "the end-to-end likelihood objective) and save them as a folder "
                                   "(directions.safetensors + config.json).")
    _common(p)
    p.add_argument("--heads", required=True, help="ranking JSON from 'focuslens score'")
    p.add_argument("--k", type=int, default=20, help="number of top heads [20]")
    p.add_argument("--objective", default="attention", choices=["attention", "likelihood", "both"], help="[attention]")
    p.add_argument("--n-val", type=int, default=30, help="validation examples for early stopping [30]")
    p.add_argument("--select-alphas", type=float, nargs="+", default=None, metavar="ALPHA",
                   help="after training, choose k and alpha by validation accuracy over these alphas (and "
                        "--select-ks, --select-targets); the saved artefact keeps the chosen top-k heads and "
                        "alpha as its default")
    p.add_argument("--select-ks", type=int, nargs="+", default=None, metavar="K", help="top-k values to try [--k]")
    p.add_argument("--select-targets", type=float, nargs="+", default=(), metavar="T",
                   help="magnitude-control targets in (0, 1) to try at the chosen k")
    p.add_argument("--output", default="focus_directions", help="artefact folder")
    _engine_flag(p)

    p = sub.add_parser("evaluate", help="accuracy with and without an intervention",
                       description="Greedy answers and best-subspan EM on a task, optionally with focus directions "
                                   "(--directions) or split softmax (--heads + --tau). Resumable JSONL records.")
    _common(p)
    p.add_argument("--variant", default="original", choices=["original", "gold_only", "negative"], help="[original]")
    p.add_argument("--directions", default=None, help="a focus-directions folder")
    p.add_argument("--alpha", default=None, help="alpha for the directions (a number, or 'auto' for magnitude control)")
    p.add_argument("--heads", default=None, help="ranking JSON: apply split softmax to its top --k heads")
    p.add_argument("--k", type=int, default=20, help="heads for split softmax [20]")
    p.add_argument("--tau", type=float, default=None, help="split-softmax exponent, > 0")
    p.add_argument("--output", default="focuslens_eval", help="output folder")
    _engine_flag(p)

    p = sub.add_parser("plot", help="head-location heatmap of a saved ranking",
                       description="Draw the [layer, head] heatmap of a ranking JSON written by 'score' or the demo.")
    p.add_argument("ranking", help="ranking JSON")
    p.add_argument("--top-k", type=int, default=20, help="heads to mark [20]")
    p.add_argument("--output", default="figures/contextual_heads", help="path stem: writes .html and .png")
    _debug_flag(p)

    p = sub.add_parser("info", help="print the model's architecture", description="Load a model and print its fingerprint.")
    _common(p, data=False)
    return ap



# --------------------------------------------------------------------------------------------------
# Shared steps
# --------------------------------------------------------------------------------------------------


def _model(args):
    import torch

    from .core.models import load_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # a local folder by its resolved path: the same folder given as ./m or /abs/m is the same model (its
    # name enters every record's configuration, which a rerun must match to resume)
    source = str(Path(args.model).resolve()) if args.model is not None and Path(args.model).exists() else args.model
    try:
        # quiet: the CLI's stderr carries one line when a command fails (load_model's summary line would be a second)
        model = load_model(source, device=args.device, dtype=getattr(torch, args.dtype), verbose=False)
    except FileNotFoundError:
        raise
    except UsageError as e:  # the library says what is wrong; the CLI names the flag that gave it
        msg = str(e)
        raise (e if msg.startswith("--model") else UsageError(f"--model {args.model}: {msg}")) from None
    except ImportError as e:  # a GGUF file without the gguf package: its message says what to install
        raise UsageError(f"--model {args.model}: {one_line(e)}") from None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError, UnpicklingError) as e:
        # corrupt config.json, truncated weights, a pickled .bin refused by weights_only=True, no hub, ...
        raise UsageError(f"--model {args.model or '(default)'}: cannot load this model ({type(e).__name__}: "
                         f"{one_line(e)}); check that it is a complete Hugging Face checkpoint (config.json, "
                         "weights, tokenizer) or a GGUF file transformers can read") from None
    # a base model: refused here, before any prompt is rendered, with the flag that fixes it
    require_arg(not getattr(args, "chat", False) or getattr(model.tokenizer, "chat_template", None) is not None,
                f"--model {args.model}: its tokenizer has no chat template (a base model); pass --no-chat to "
                "render the prompts as plain text")
    return model


def _examples(args, n: int | None = None, offset: int | None = None, *, what: str = "--n"):
    n = args.n if n is None else n
    offset = args.offset if offset is None else offset
    if args.data == "synthetic":
        from .tasks import make_synthetic_qa

        return make_synthetic_qa(offset + n, n_docs=args.n_docs, seed=args.seed)[offset:]
    from .tasks import litm

    ex = litm.load_litm(args.data)
    require_arg(offset < len(ex), f"{what}: skipping the first {offset} examples leaves none of the {len(ex)} in {args.data}"
          " (lower --offset/--n)")
    return ex[offset : offset + n]


def _check_prompts(model, examples, args, *, variant: str = "original") -> None:
    """Every prompt plus the generation budget fits the model's context (one message naming both)."""
    from .core.models import check_context
    from .tasks import render

    for i, e in enumerate(examples):
        r = e if hasattr(e, "prompt") else render(e, model.tokenizer, variant=variant, chat=args.chat)
        n = len(r.prompt.tokens)
        check_context(model, n + args.max_new_tokens,
                      what=f"example {i} ({n} prompt tokens + --max-new-tokens {args.max_new_tokens})")


_CHECKSUMS: dict[tuple[str, int, int], str] = {}


def _file_checksum(path: str | os.PathLike) -> str:
    """:func:`focuslens.core.io.file_checksum` of a file (cached per path, size and mtime)."""
    from .core.io import file_checksum

    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _CHECKSUMS:
        _CHECKSUMS[key] = file_checksum(p)
    return _CHECKSUMS[key]


def _data_identity(args, n: int | None = None, offset: int | None = None) -> dict:
    """What the examples of this command are made from (part of every stored result's key)."""
    source = "synthetic" if args.data == "synthetic" else {"file": str(Path(args.data).resolve()),
                                                           "checksum": _file_checksum(args.data)}
    return {"data": source, "n": args.n if n is None else n, "offset": args.offset if offset is None else offset,
            "seed": args.seed, "n_docs": args.n_docs}


def _model_identity(args) -> dict:
    m = args.model
    if m is not None and Path(m).exists():
        m = str(Path(m).resolve())
    return {"model": m, "dtype": args.dtype}


def _out(args) -> Path:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _load_heads(path: str, model, k: int | None = None):
    from .score.ranking import load_heads

    return load_heads(path, k=k, model=model)


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


def cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo
    from .core.io import output_lock

    kw = dict(model=args.model, seed=args.seed, threads=args.threads, objective=args.objective)
    if args.n_test:
        kw["n_test"] = args.n_test
    cfg = DemoConfig.full(**kw) if args.full else DemoConfig(**kw)
    with output_lock(args.output):
        run_demo(cfg, args.output, figures_dir=args.figures)
    return 0


def cmd_score(args) -> int:
    from .core.io import output_lock
    from .core.models import model_info
    from .plot.figures import head_heatmap, save_figure
    from .score.contextual import score_dataset
    from .tasks import render

    examples = _examples(args)
    model = _model(args)
    rendered = [render(e, model.tokenizer, chat=args.chat) for e in examples]
    _check_prompts(model, rendered, args)
    out = _out(args)
    with output_lock(out / "contextual_heads.json"):
        ds = score_dataset(model, rendered, response=args.response, max_new_tokens=args.max_new_tokens)
        ds.save(out / "contextual_heads.json")
        fig = head_heatmap(ds, top_k=args.top_k, model=model,
                           title=f"Contextual scores ({model_info(model).name}, n={ds.n})")
        save_figure(fig, out / "contextual_heads")
    print(f"scored {ds.n} examples ({ds.n_skipped} skipped); top-{args.top_k} heads:")
    for i, (l, h, v) in enumerate(ds.ranking()[: args.top_k], 1):
        print(f"  {i:>3}. L{l}H{h}  {v:.4f}")
    print(f"wrote {out / 'contextual_heads.json'} and the heatmap")
    return 0


def _eval(model, examples, args, out: Path, name: str, spec=None, variant: str = "original",
          source: dict | None = None) -> dict:
    """Evaluate ``spec`` into ``out/{name}-{content hash}.jsonl`` (resumed when it is the same run).

    The file name and the records' configuration both carry the content identity (spec, its source,
    data, model argument, decoding), so two different configurations never share a file; the file is
    written under its output lock (a second process on the same configuration is refused).
    """
    from .evaluation.runner import evaluate
    from .core.io import content_hash, output_lock_if_writable

    context = {"data": _data_identity(args), "model": _model_identity(args), "source": source}
    # chat enters the key only when off: the files written before --no-chat existed keep their names
    key = content_hash({"intervene": None if spec is None else spec.identity, **context, "variant": variant,
                        "max_new_tokens": args.max_new_tokens, **({} if args.chat else {"chat": False})})
    path = out / f"{name}-{key[:12]}.jsonl"
    with output_lock_if_writable(path):  # read-only: finished records are read; evaluate refuses a write
        try:
            res = evaluate(model, examples, variant=variant, intervene=spec, output=path,
                           max_new_tokens=args.max_new_tokens, chat=args.chat, tag=context, engine=args.engine)
        except ValueError as e:  # the library's advice (resume=False) is not a CLI option: give the CLI's
            msg = str(e)
            if "resume=False" not in msg:
                raise
            cut = msg.find("Use another output file")
            raise UsageError(f"{msg[:cut] if cut >= 0 else msg} Give another --output folder, or delete {path} "
                             "to run this evaluation again from the start.") from None
    s = res.summary()
    print(f"  {name:<32} n={s['n']:<4} accuracy {s['accuracy']:.3f} ± {s['accuracy_se']:.3f}   "
          f"distractor copy {s['distractor_copy']:.3f}")
    return {k: s[k] for k in ("n", "accuracy", "accuracy_se", "distractor_copy", "distractor_copy_se")}


def cmd_sweep(args) -> int:
    from .core.io import atomic_write_json, output_lock
    from .plot.figures import ablation_curve, save_figure
    from .score.ranking import load_heads
    from .intervene.span_specs import SplitSoftmax
    from .evaluation.sweeps import random_heads
    from .tasks import render

    n_ranked = len(load_heads(args.heads))
    require_arg(max(args.ks) <= n_ranked, f"--ks: k={max(args.ks)} exceeds the {n_ranked} heads in {args.heads}")
    raw = _examples(args)
    model = _model(args)
    ranking = _load_heads(args.heads, model)
    examples = [render(e, model.tokenizer, chat=args.chat) for e in raw]
    _check_prompts(model, examples, args)
    out = _out(args)
    ranking_sum = _file_checksum(args.heads)
    with output_lock(out / "sweep.json"):
        res = {"original": _eval(model, examples, args, out, "original")}
        for tau in args.taus:
            for k in args.ks:
                res[f"top{k}_tau{tau}"] = _eval(model, examples, args, out, f"top{k}_tau{tau}",
                                                spec=SplitSoftmax(ranking[:k], tau),
                                                source={"ranking": ranking_sum, "k": k})
                for s in args.random_seeds:
                    rh = random_heads(model, k, seed=s)
                    res[f"random{k}_tau{tau}_s{s}"] = _eval(model, examples, args, out, f"random{k}_tau{tau}_s{s}",
                                                            spec=SplitSoftmax(rh, tau),
                                                            source={"random_heads": {"k": k, "seed": s}})
        series = {}
        for tau in args.taus:
            series[f"top-k, τ={tau}"] = ([res[f"top{k}_tau{tau}"]["accuracy"] for k in args.ks],
                                         [res[f"top{k}_tau{tau}"]["accuracy_se"] for k in args.ks])
            series[f"random k, τ={tau}"] = (
                [sum(res[f"random{k}_tau{tau}_s{s}"]["accuracy"] for s in args.random_seeds) / len(args.random_seeds)
                 for k in args.ks], None)
        fig = ablation_curve(args.ks, series, baselines={"original": res["original"]["accuracy"]},
                             xaxis="k", yaxis="accuracy", title="Split softmax on the top-k contextual heads")
        save_figure(fig, out / "split_softmax_curve")
        atomic_write_json(out / "sweep.json", res)
    print(f"wrote {out / 'sweep.json'} and the ablation curve")
    return 0


def cmd_train(args) -> int:
    from . import directions as fd
    from .evaluation.sweeps import select_alpha
    from .core.io import output_lock
    from .score.ranking import load_heads

    load_heads(args.heads, k=args.k)  # format and k, before the model
    train = _examples(args)
    val = _examples(args, n=args.n_val, offset=args.offset + args.n, what="--n-val")
    model = _model(args)
    heads = _load_heads(args.heads, model, k=args.k)
    _check_prompts(model, train + val, args)
    with output_lock(args.output):
        train_d = fd.make_direction_examples(model, train, max_new_tokens=args.max_new_tokens, chat=args.chat)
        val_d = fd.make_direction_examples(model, val, max_new_tokens=args.max_new_tokens, chat=args.chat)
        d = fd.train_focus_directions(model, train_d, heads=heads, objective=args.objective, val_examples=val_d,
                                      seed=args.seed, checkpoint_dir=Path(args.output + ".ckpt"))
        if args.select_alphas:
            sel = select_alpha(model, d, val, alphas=args.select_alphas, ks=args.select_ks,
                                  targets=args.select_targets, max_new_tokens=args.max_new_tokens,
                                  chat=args.chat, output_dir=Path(args.output + ".select"), engine=args.engine)
            print(sel.table())
            fixed = sel.best_fixed
            d = d.top(sel.k)._replace(alpha=float(fixed["alpha"]),
                                      training={**d.training, "alpha_selection": sel.to_dict()})
            print(f"chosen on {len(val)} validation examples: k={sel.k}, alpha={sel.alpha}"
                  + (f" (magnitude-control target {sel.target:g})" if sel.target is not None else ""))
        d.save(args.output)
    print(f"saved {len(d)} focus directions ({args.objective}) to {args.output}")
    if d.training:
        print(json.dumps({k: v for k, v in d.training.items() if not isinstance(v, (list, dict))}, indent=2, default=str))
    return 0


def cmd_evaluate(args) -> int:
    from .tasks import render

    examples = _examples(args)
    d = heads = None
    if args.directions:
        from .directions import FocusDirections

        d = FocusDirections.load(args.directions)
    elif args.heads:
        from .score.ranking import load_heads

        load_heads(args.heads, k=args.k)  # format and k, before the model
    model = _model(args)
    if d is not None:
        d.check_model(model)
    elif args.heads:
        heads = _load_heads(args.heads, model, k=args.k)
    _check_prompts(model, examples, args, variant=args.variant)
    if args.variant == "original":
        examples = [render(e, model.tokenizer, chat=args.chat) for e in examples]
    out = _out(args)
    if d is not None:
        from .core.io import tensor_checksum
        from .directions.artefact import Steer

        alpha = args.alpha if args.alpha is not None else d.alpha
        alpha = alpha if alpha == "auto" else float(alpha)
        _eval(model, examples, args, out, f"directions_alpha{alpha if alpha == 'auto' else format(alpha, 'g')}",
              spec=Steer(d, alpha=alpha), variant=args.variant, source={"directions": tensor_checksum(d.vectors)})
    elif heads is not None:
        from .intervene.span_specs import SplitSoftmax

        _eval(model, examples, args, out, f"split_softmax_k{args.k}_tau{args.tau:g}",
              spec=SplitSoftmax(heads, args.tau), variant=args.variant,
              source={"ranking": _file_checksum(args.heads), "k": args.k})
    else:
        _eval(model, examples, args, out, f"plain_{args.variant}", variant=args.variant)
    return 0


def cmd_plot(args) -> int:
    from .plot.figures import head_heatmap, save_figure
    from .score.ranking import DatasetScores

    ds = DatasetScores.load(args.ranking)
    fig = head_heatmap(ds.mean["relevant"], top_k=args.top_k, title=f"Contextual scores ({ds.model}, n={ds.n})")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    for f in save_figure(fig, args.output):
        print(f"wrote {f}")
    return 0


def cmd_info(args) -> int:
    from .core.models import model_info

    info = model_info(_model(args))
    print(json.dumps({"name": info.name, **info.fingerprint()}, indent=2))
    return 0


COMMANDS = {"demo": cmd_demo, "score": cmd_score, "sweep": cmd_sweep, "train": cmd_train,
            "evaluate": cmd_evaluate, "plot": cmd_plot, "info": cmd_info}

# What a rerun after Ctrl-C does: these keep finished work (JSONL records, training checkpoints).
RESUMES = {"demo": "rerun the same command to resume (finished steps are kept)",
           "sweep": "rerun the same command to resume (finished records are kept)",
           "evaluate": "rerun the same command to resume (finished records are kept)",
           "train": "rerun the same command to resume from the last training checkpoint",
           "score": "score does not resume: a rerun starts over",
           "plot": "nothing was written", "info": "nothing was written"}


# --------------------------------------------------------------------------------------------------
# The error boundary
# --------------------------------------------------------------------------------------------------


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"focuslens: warning: {' '.join(str(message).split())}\n"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 2 a problem with the input (one line on stderr saying what
    and how to fix it), 1 an internal error (one line naming the file with the traceback), 130 Ctrl-C.
    ``--debug`` (or ``FOCUSLENS_DEBUG=1``) also prints the full traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except _ArgError as e:
        print(str(e), file=sys.stderr)
        return 2
    if not args.command:
        ap.print_help()
        return 2
    debug = bool(getattr(args, "debug", False) or os.environ.get("FOCUSLENS_DEBUG"))
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # keep the CLI's own output readable
    except Exception:  # pragma: no cover - transformers is a hard dependency
        pass
    import warnings

    fmt, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        _validate(args)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"focuslens {args.command}: interrupted; {RESUMES[args.command]}", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            import traceback

            traceback.print_exc()
        if is_expected(e):
            print(f"focuslens {args.command}: error: {one_line(e)}", file=sys.stderr)
            return 2
        where = write_traceback(args.command)
        print(f"focuslens {args.command}: internal error ({type(e).__name__}: {one_line(e)}); this is a bug: "
              f"please report it with the traceback written to {where}"
              + ("" if debug else " (or rerun with --debug to print it)"), file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = fmt


if __name__ == "__main__":
    sys.exit(main())
