"""The CLI's argument checks: every argument of a command, before the model is loaded.

A problem found here is a :class:`~focuslens.core.errors.UsageError` (or ``FileNotFoundError``) whose message
names the flag, what is wrong and how to fix it; :func:`focuslens.cli.main` prints it as one line and
exits 2. The rules that the library also applies (the selection grid) are called, not repeated.
"""

from __future__ import annotations

from pathlib import Path

from .core.checks import check_regular_file, head_list, positive, real
from .core.errors import UsageError

__all__ = ["validate"]


def require_arg(ok: bool, msg: str) -> None:
    if not ok:
        raise UsageError(msg)


def _check_output(path: str, name: str = "--output", *, folder: bool = True) -> None:
    p = Path(path)
    if folder:
        require_arg(not (p.exists() and not p.is_dir()),
              f"{name} {path} exists and is a file; give a folder path (it is created if missing)")
    else:
        require_arg(not p.is_dir(), f"{name} {path} is a folder; give a path stem such as figures/heads")
    for parent in p.absolute().parents:
        if parent.exists():
            require_arg(parent.is_dir(), f"{name} {path}: {parent} is a file, not a folder; choose another path")
            break


def _check_device(device: str) -> None:
    from .core.checks import check_device

    check_device(device, name="--device")


def _check_file(path: str, name: str, what: str) -> None:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{name} {path}: no such file ({what})")
    require_arg(not p.is_dir(), f"{name} {path} is a folder; give {what}")
    try:  # a FIFO, a device (/dev/zero), an unreadable file: said as such (the library's rule)
        check_regular_file(p, what=what)
    except UsageError as e:
        raise UsageError(f"{name} {e}") from None


_TAU_WHY = "tau = 1 is the identity, tau < 1 raises attention on the span and tau > 1 lowers it"


def _library_check(check, *args, **kw):
    """A check of :mod:`focuslens.core.checks` (the rule every route applies), its refusal as a UsageError
    that names the flag (``--alpha must be finite, got nan.``)."""
    try:
        return check(*args, **kw)
    except ValueError as e:
        msg, prefix = str(e), f"{kw.get('what', '')}: "
        named = str(kw.get("name", "")).startswith("--")  # the flag is the name: drop the "--flag: " prefix
        raise UsageError(msg[len(prefix):] if named and msg.startswith(prefix) else msg) from None


def _check_heads_file(path: str, *, k: int) -> None:
    """The heads the command will use (the first ``k`` of the file), before the model: the file's format
    (:func:`~focuslens.score.ranking.load_heads`: pairs of ints, no bools or floats) and
    :func:`~focuslens.core.checks.head_list` (none twice); their ranges are checked once the model is loaded."""
    from .score.ranking import load_heads

    heads = load_heads(path)
    _library_check(head_list, heads[:k], what=f"--heads {path}")


def validate(args) -> None:
    """Every argument of the command, before the model is loaded (exit 2 with one line otherwise)."""
    c = args.command
    if getattr(args, "threads", None) is not None:
        require_arg(args.threads >= 1, f"--threads must be >= 1, got {args.threads}")
    if hasattr(args, "device"):
        _check_device(args.device)
    if getattr(args, "model", None) is not None:
        from .core.models import is_gguf_file  # load_model's own test: a GGUF file by its magic bytes

        m = Path(args.model).expanduser()
        if m.is_file():
            require_arg(is_gguf_file(m),
                  f"--model {args.model} is not a Hugging Face checkpoint folder, nor a GGUF model file (it does "
                  "not start with the bytes GGUF); give a .gguf file or the folder that holds config.json, the "
                  "weights and the tokenizer")
        elif m.exists():
            ggufs = sorted(x.name for x in m.glob("*.gguf")) if m.is_dir() else []
            require_arg(m.is_dir() and (m / "config.json").is_file(),
                  f"--model {args.model} is not a Hugging Face checkpoint folder (no config.json); give the folder "
                  "that holds config.json, the weights and the tokenizer"
                  + (f", or a GGUF file: --model {m / ggufs[0]}" if ggufs else ", or a GGUF file"))
    if hasattr(args, "data"):
        require_arg(args.n >= 1, f"--n must be positive, got {args.n}")
        require_arg(args.n_docs >= 1, f"--n-docs must be >= 1, got {args.n_docs}")
        require_arg(args.offset >= 0, f"--offset must be >= 0 (examples to skip), got {args.offset}")
        require_arg(args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if c in ("demo", "score", "sweep", "train", "evaluate"):
        _check_output(args.output)
    if c == "demo":
        require_arg(args.n_test is None or args.n_test >= 1, f"--n-test must be >= 1, got {args.n_test}")
        if args.figures:
            _check_output(args.figures, "--figures")
    if c in ("score", "plot"):
        require_arg(args.top_k >= 1, f"--top-k must be >= 1, got {args.top_k}")
    if c == "plot":
        _check_file(args.ranking, "ranking", "a ranking JSON written by 'focuslens score'")
        _check_output(args.output, folder=False)
    if c == "sweep":
        require_arg(bool(args.ks) and min(args.ks) >= 1, f"--ks must be positive integers, got {args.ks}")
        require_arg(bool(args.taus), "--taus needs at least one value in (0, 1], e.g. --taus 0.2,0.5")
        for t in args.taus:
            _library_check(positive, t, name="tau", what="--taus", why=_TAU_WHY)
        require_arg(bool(args.random_seeds), "--random-seeds needs at least one seed for the random-head control, e.g. 0,1")
    if c == "train":
        t = Path(args.output)
        require_arg(not t.is_dir() or not any(t.iterdir()) or (t / "config.json").is_file(),
              f"--output {args.output} is a folder that is not a focus-directions artefact; saving would replace "
              "it (deleting its files): choose another path")
        require_arg(args.k >= 1, f"--k must be >= 1, got {args.k}")
        require_arg(args.n_val >= 1, f"--n-val (validation examples) must be >= 1, got {args.n_val}")
        for a in args.select_alphas or ():
            _library_check(real, a, name="--select-alphas", what="--select-alphas")
        if args.select_alphas is None:
            require_arg(args.select_ks is None and not args.select_targets,
                  "--select-ks and --select-targets need --select-alphas (the alpha grid to choose from)")
        else:  # the library's one rule, with the flags' names in the message
            from .evaluation.sweeps import check_selection_grid

            try:
                check_selection_grid(args.select_alphas, args.select_ks, args.select_targets, n_heads=args.k,
                                     names={"alphas": "--select-alphas", "ks": "--select-ks",
                                            "targets": "--select-targets", "n_heads": f"--k ({args.k})"})
            except ValueError as e:
                raise UsageError(str(e)) from None
    if c == "evaluate":
        require_arg(not (args.directions and args.heads), "give either --directions or --heads/--tau, not both")
        require_arg(args.alpha is None or bool(args.directions), "--alpha needs --directions (a focus-directions folder)")
        require_arg(args.tau is None or bool(args.heads), "--tau needs --heads (a ranking JSON for split softmax)")
        if args.heads:
            require_arg(args.tau is not None, "--tau must be given and > 0 with --heads (e.g. --tau 0.2)")
            try:  # the library's rule for tau (core.checks.positive), in the words of this flag
                positive(args.tau, name="tau", what="--tau", why=_TAU_WHY)
            except ValueError:
                raise UsageError(f"--tau must be given and > 0: tau must be > 0 and finite, got {args.tau!r} "
                                 f"({_TAU_WHY})") from None
            require_arg(args.k >= 1, f"--k must be >= 1, got {args.k}")
            require_arg(args.variant != "negative",
                  "--variant negative removes the gold document, so split softmax (--heads) has no span to raise "
                  "attention on; use --variant original or gold_only, or --directions")
        if args.directions:
            d = Path(args.directions)
            if not d.exists():
                raise FileNotFoundError(f"--directions {args.directions}: no such folder (make one with 'focuslens train')")
            require_arg(d.is_dir(), f"--directions {args.directions} is a file; give the folder written by 'focuslens train'")
        if args.alpha is not None and args.alpha != "auto":
            try:
                a = float(args.alpha)
            except ValueError:
                raise UsageError(f"--alpha must be a number or 'auto', got {args.alpha!r}") from None
            _library_check(real, a, name="--alpha", what="--alpha")
    if hasattr(args, "data") and args.data != "synthetic":  # files last: values first
        _check_file(args.data, "--data", "'synthetic' or a Lost-in-the-Middle .jsonl(.gz) file")
    if c in ("sweep", "train") or (c == "evaluate" and args.heads):
        _check_file(args.heads, "--heads", "a ranking JSON from 'focuslens score' or [[layer, head], ...]")
        _check_heads_file(args.heads, k=max(args.ks) if c == "sweep" else args.k)
