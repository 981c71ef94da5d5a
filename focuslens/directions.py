"""Focus directions: learned per-head query vectors that move attention onto the relevant context.

What this is (METHOD.md §4)
---------------------------
For each selected head (l, h) one vector ``u ∈ R^d_head`` is added, scaled by α, to the **post-RoPE**
query of every position (prompt and generated tokens):  ``q̃_t = RoPE_t(q_t) + α·u``. The head's
logits gain the query-independent, key-dependent bias ``α·u·k_j·scale``: a learned "look at keys like
these" preference. A key-side vector (the authors also train one) is inert: it adds terms constant in
j, which the softmax cancels (:func:`attention_mass` shows it; the tests check it). None is stored.

How they are learned (which objective should you use?)
------------------------------------------------------
Training examples are the full prompt with the response the model gives on the *gold-only* prompt
appended (:func:`make_direction_examples`); ``R`` = response rows, ``C`` = the relevant document.

* ``objective="attention"`` (the paper's): maximise the mean attention mass ``Σ_{j∈C} A_{t,j}`` of
  response rows, per head, on the *unmodified* model's activations. Because only the selected heads'
  queries (response rows) and keys enter the loss, one frozen forward pass per example caches them
  (:func:`cache_qk`) and the optimisation runs on those tensors: all heads jointly as one batched
  problem (``method="batched"``, full-batch Adam, seconds) or the authors' loop (``method="per_layer"``:
  per layer, batch 1, AdamW lr 1e-3, init N(0, 0.01²), 10 epochs), kept as a reference.
* ``objective="likelihood"`` (this project's documented alternative, METHOD.md §6): the selected
  heads' vectors are trained jointly *through the live frozen model* (hooks add α·u at the query site,
  gradients reach u only) on the log-likelihood of the response given the full prompt.
  ``objective="both"`` adds ``attention_weight ×`` the (live) attention objective.

Which to use: the attention objective is exact, cheap and what the paper describes, but raising the
average attention mass did not move accuracy on SmolLM2 in our measurements (docs/directions.md); the
likelihood objective did. Offer both, compare against random vectors of matched norm.

Applying and magnitude control
------------------------------
``with directions.apply(model, alpha=0.5):`` injects through
:func:`focuslens.interventions.inject_vectors`. ``alpha="auto"`` is **this project's own magnitude
control** (the revised paper's algorithm is not public): from one probe pass over the prompt, choose
α per head so that the last prompt row's attention on the sink (first token) falls by a target
fraction (:func:`sink_target_alphas`). No labels are needed at inference.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .generation import DEFAULT_MAX_NEW_TOKENS, generate_response
from .io import atomic_dir
from .hooks import HookHandle, attach_hooks, expand_kv
from .models import Head, HookedModel, check_heads, hook_name, model_info
from .prompts import LabelledPrompt, Span, as_span

__all__ = [
    "FocusDirections",
    "DirectionExample",
    "QKCache",
    "make_direction_examples",
    "cache_qk",
    "attention_mass",
    "attention_scale",
    "query_site",
    "train_focus_directions",
    "heldout_attention",
    "sink_target_alphas",
    "calibrate_sink_target",
    "random_like",
    "select_alpha",
    "AlphaSelection",
    "WEIGHTS_FILE",
    "CONFIG_FILE",
]

WEIGHTS_FILE = "directions.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1

Objective = Literal["attention", "likelihood", "both"]
Method = Literal["batched", "per_layer"]
_NEG = -1e30  # masked logit (finite, like the bridge's finfo.min, but safe under addition)


# --------------------------------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------------------------------


def query_site(model: HookedModel) -> str:
    """``"hook_rot_q"`` on rotary models (post-RoPE, the paper's site), else ``"hook_q"``."""
    return "hook_rot_q" if model_info(model).rotary else "hook_q"


def _key_site(model: HookedModel) -> str:
    return "hook_rot_k" if model_info(model).rotary else "hook_k"


def attention_scale(model: HookedModel, layer: int = 0) -> float:
    """The factor the model multiplies ``q·k`` by before the softmax (``1/sqrt(d_head)`` usually).

    Read from the wrapped Hugging Face attention module (``scaling``), because some models (Gemma)
    use another constant; falls back to TransformerLens' ``cfg.attn_scale`` and then ``d_head**-0.5``.
    ``tests/test_directions.py`` checks it by rebuilding ``hook_attn_scores`` from cached q and k.
    """
    try:
        attn = model.blocks[layer].attn
        for name in ("_original_component", "original_component"):
            comp = getattr(attn, name, None)
            s = getattr(comp, "scaling", None) if comp is not None else None
            if isinstance(s, (int, float)) and s > 0:
                return float(s)
    except (AttributeError, IndexError, TypeError):
        pass
    cfg = model.cfg
    a = getattr(cfg, "attn_scale", None)
    if getattr(cfg, "use_attn_scale", True) and isinstance(a, (int, float)) and a > 0:
        return 1.0 / float(a)
    return 1.0 / math.sqrt(model_info(model).d_head)


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("torch", "transformer_lens", "transformers", "safetensors"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            out[mod] = "unknown"
    try:
        from . import __version__ as flv

        out["focuslens"] = flv
    except Exception:  # pragma: no cover
        out["focuslens"] = "unknown"
    return out


def _fingerprint_diff(saved: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(actual))
    return [f"{k}: directions have {saved.get(k)!r}, model has {actual.get(k)!r}"
            for k in keys if saved.get(k) != actual.get(k)]


# --------------------------------------------------------------------------------------------------
# The artefact
# --------------------------------------------------------------------------------------------------


@dataclass
class FocusDirections:
    """Per-head query vectors plus what they belong to.

    Attributes:
        heads: ``(layer, query_head)`` pairs, in rank order when known (``top(k)`` takes the first k).
        vectors: ``[n_heads, d_head]``; row i belongs to ``heads[i]``.
        fingerprint: ``model_info(model).fingerprint()`` of the model they were learned on
            (layers, heads, KV heads, d_head, d_model, rotary, n_ctx); checked on apply/load.
        model_name: informative only (not checked).
        site: hook where ``alpha * u`` is added (``hook_rot_q`` for rotary models, else ``hook_q``).
        alpha: default α for :meth:`apply`.
        objective: how they were learned (``attention``, ``likelihood``, ``both``, ``authors``,
            ``random``, or an arithmetic expression of those).
        training: a JSON-serialisable summary (data, hyper-parameters, held-out attention before/after).
        versions: library versions at creation.

    Arithmetic returns new objects: ``0.5 * d``, ``-d``, ``d1 + d2`` (same heads and fingerprint).

    Example:
        >>> d = train_focus_directions(model, train, heads=heads, val_examples=val)
        >>> d.save("runs/fd")
        >>> d = FocusDirections.load("runs/fd")
        >>> with d.top(10).apply(model, alpha=0.5):
        ...     out = model.generate(tokens[None], max_new_tokens=20, do_sample=False, verbose=False)
    """

    heads: list[Head]
    vectors: Float[Tensor, "n d_head"]
    fingerprint: dict[str, Any]
    model_name: str = ""
    site: str = "hook_rot_q"
    alpha: float = 1.0
    objective: str = "attention"
    training: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=_versions)

    def __post_init__(self) -> None:
        self.heads = [(int(l), int(h)) for l, h in self.heads]
        if len(set(self.heads)) != len(self.heads):
            raise ValueError("FocusDirections: a head is listed twice.")
        v = torch.as_tensor(self.vectors)
        if v.dim() != 2 or v.shape[0] != len(self.heads):
            raise ValueError(
                f"vectors must be [n_heads, d_head] with one row per head ({len(self.heads)} heads); "
                f"got shape {tuple(v.shape)}."
            )
        d = self.fingerprint.get("d_head")
        if d is not None and v.shape[1] != d:
            raise ValueError(f"vectors have d_head={v.shape[1]} but the fingerprint says {d}.")
        self.vectors = v.detach()

    # --- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.heads)

    @property
    def d_head(self) -> int:
        return int(self.vectors.shape[1])

    def as_dict(self) -> dict[Head, Float[Tensor, "d_head"]]:
        """``{(layer, head): Tensor[d_head]}`` (views of :attr:`vectors`)."""
        return {h: self.vectors[i] for i, h in enumerate(self.heads)}

    def __getitem__(self, head: Sequence[int]) -> Float[Tensor, "d_head"]:
        key = (int(head[0]), int(head[1]))
        try:
            return self.vectors[self.heads.index(key)]
        except ValueError:
            raise KeyError(f"No direction for head {key}; these directions cover {self.heads}.") from None

    def norms(self) -> Float[Tensor, "n"]:
        return self.vectors.norm(dim=-1)

    def _replace(self, **kw: Any) -> "FocusDirections":
        base = dict(heads=list(self.heads), vectors=self.vectors, fingerprint=dict(self.fingerprint),
                    model_name=self.model_name, site=self.site, alpha=self.alpha,
                    objective=self.objective, training=dict(self.training), versions=dict(self.versions))
        base.update(kw)
        return FocusDirections(**base)

    def top(self, k: int) -> "FocusDirections":
        """The first ``k`` heads (heads are stored in rank order when trained from a ranking)."""
        if not isinstance(k, int) or not 1 <= k <= len(self):
            raise ValueError(f"top(k) needs 1 <= k <= {len(self)} (the number of heads); got {k!r}.")
        return self._replace(heads=self.heads[:k], vectors=self.vectors[:k].clone())

    def select(self, heads: Iterable[Sequence[int]]) -> "FocusDirections":
        """A subset, in the order given; raises if a head has no direction."""
        hs = [(int(l), int(h)) for l, h in heads]
        missing = [h for h in hs if h not in self.heads]
        if missing:
            raise ValueError(f"No direction for heads {missing}; available: {self.heads}.")
        idx = [self.heads.index(h) for h in hs]
        return self._replace(heads=hs, vectors=self.vectors[idx].clone())

    def scaled(self, factors: Float[Tensor, "n"] | Sequence[float]) -> "FocusDirections":
        """Scale each head's vector by its own factor (used by the magnitude control)."""
        f = torch.as_tensor(factors, dtype=self.vectors.dtype, device=self.vectors.device).flatten()
        if f.numel() != len(self):
            raise ValueError(f"Need one factor per head ({len(self)}), got {f.numel()}.")
        return self._replace(vectors=self.vectors * f[:, None])

    # --- arithmetic (repeng style) ---------------------------------------------------------------
    def __mul__(self, c: float) -> "FocusDirections":
        if not isinstance(c, (int, float)):
            return NotImplemented
        return self._replace(vectors=self.vectors * float(c), objective=f"{c:g}*({self.objective})")

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> "FocusDirections":
        return self * (1.0 / c)

    def __neg__(self) -> "FocusDirections":
        return self._replace(vectors=-self.vectors, objective=f"-({self.objective})")

    def __add__(self, other: "FocusDirections") -> "FocusDirections":
        if not isinstance(other, FocusDirections):
            return NotImplemented
        diff = _fingerprint_diff(self.fingerprint, other.fingerprint)
        if diff:
            raise ValueError("Cannot add directions of different models: " + "; ".join(diff))
        if set(self.heads) != set(other.heads):
            raise ValueError(
                f"Cannot add directions with different heads: only left {sorted(set(self.heads) - set(other.heads))}, "
                f"only right {sorted(set(other.heads) - set(self.heads))}. Use .select(heads) first."
            )
        if self.site != other.site:
            raise ValueError(f"Cannot add directions for different hook sites ({self.site} vs {other.site}).")
        o = other.select(self.heads)
        return self._replace(vectors=self.vectors + o.vectors.to(self.vectors),
                             objective=f"({self.objective})+({other.objective})")

    def __sub__(self, other: "FocusDirections") -> "FocusDirections":
        return self + (-other)

    # --- model checks and application ------------------------------------------------------------
    def check_model(self, model: HookedModel) -> None:
        """Raise ``ValueError`` naming every architecture field that differs from :attr:`fingerprint`."""
        diff = _fingerprint_diff(self.fingerprint, model_info(model).fingerprint())
        if diff:
            raise ValueError(
                f"These focus directions were learned on another architecture ({self.model_name or 'unnamed'}); "
                "refusing to apply them: " + "; ".join(diff)
            )
        check_heads(model, self.heads)

    def apply(
        self,
        model: HookedModel,
        *,
        alpha: float | Literal["auto"] | None = None,
        heads: Iterable[Sequence[int]] | int | None = None,
        tokens: Int[Tensor, "pos"] | LabelledPrompt | None = None,
        target: float = 0.5,
        alpha_max: float = 4.0,
        per: Literal["head", "input"] = "head",
    ) -> HookHandle:
        """Add ``alpha * u`` to the selected heads' queries at every position; returns a handle.

        **Mutates the model** (hooks) until ``.remove()`` or the end of the ``with`` block. Works for
        forward passes and for ``generate`` (prefill and every decoding step).

        Args:
            alpha: scale (negative pushes attention away; default :attr:`alpha`). ``"auto"``: this
                project's sink-target magnitude control — needs ``tokens`` (the prompt), runs one
                probe pass and picks α per head (:func:`sink_target_alphas`, ``target``, ``alpha_max``).
            heads: a subset (list of ``(layer, head)``) or an int k for :meth:`top`.
            tokens: the prompt, only for ``alpha="auto"``.
            per: ``"head"`` (one α per head) or ``"input"`` (one α shared by all heads, keeping the
                learned relative magnitudes; calibrate its target with :func:`calibrate_sink_target`).
        """
        d = self
        if isinstance(heads, int):
            d = d.top(heads)
        elif heads is not None:
            d = d.select(heads)
        d.check_model(model)
        expected = query_site(model)
        if d.site != expected:
            raise ValueError(f"Directions were made for {d.site} but this model's query site is {expected}.")
        if alpha is None:
            alpha = self.alpha
        if alpha == "auto":
            if tokens is None:
                raise ValueError("alpha='auto' needs the prompt: apply(model, alpha='auto', tokens=prompt.tokens).")
            alphas = sink_target_alphas(model, d, tokens, target=target, alpha_max=alpha_max, per=per)
            d, alpha = d.scaled(alphas), 1.0
        elif isinstance(alpha, str):
            raise ValueError(f"alpha must be a number or 'auto', got {alpha!r}.")
        from .interventions import inject_vectors

        return inject_vectors(model, d.as_dict(), alpha=float(alpha), site="query", pre_rope=False)

    # --- persistence ---------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "format": "focuslens.FocusDirections",
            "format_version": FORMAT_VERSION,
            "model_name": self.model_name,
            "fingerprint": self.fingerprint,
            "heads": [list(h) for h in self.heads],
            "d_head": self.d_head,
            "site": self.site,
            "alpha": self.alpha,
            "objective": self.objective,
            "training": self.training,
            "versions": self.versions,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the folder ``path`` (``directions.safetensors`` + ``config.json``) atomically.

        Files go to a temporary sibling folder which then replaces ``path``; an interrupted save
        leaves a previous artefact at ``path`` intact.
        """
        from safetensors.torch import save_file

        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not target.is_dir():
            raise ValueError(f"{target} exists and is not a folder; FocusDirections are saved as a folder.")
        with atomic_dir(target) as tmp:
            save_file({"vectors": self.vectors.detach().to("cpu").contiguous()}, str(tmp / WEIGHTS_FILE),
                      metadata={"format": "focuslens.FocusDirections"})
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config(), indent=2, default=str))
        return target

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        model: HookedModel | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> "FocusDirections":
        """Read a folder written by :meth:`save`; with ``model=`` also refuse a mismatched model."""
        from safetensors.torch import load_file

        p = Path(path)
        if not (p / CONFIG_FILE).exists() or not (p / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"{p} is not a FocusDirections folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}).")
        cfg = json.loads((p / CONFIG_FILE).read_text())
        if cfg.get("format") != "focuslens.FocusDirections":
            raise ValueError(f"{p / CONFIG_FILE} is not a focuslens FocusDirections config.")
        if int(cfg.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{p} was written by a newer focuslens (format {cfg['format_version']}); upgrade.")
        v = load_file(str(p / WEIGHTS_FILE))["vectors"]
        if device is not None or dtype is not None:
            v = v.to(device=device, dtype=dtype)
        d = cls(heads=[tuple(h) for h in cfg["heads"]], vectors=v, fingerprint=cfg["fingerprint"],
                model_name=cfg.get("model_name", ""), site=cfg.get("site", "hook_rot_q"),
                alpha=float(cfg.get("alpha", 1.0)), objective=cfg.get("objective", ""),
                training=cfg.get("training", {}), versions=cfg.get("versions", {}))
        if model is not None:
            d.check_model(model)
        return d

    @classmethod
    def from_authors(
        cls,
        folder: str | os.PathLike,
        model: HookedModel,
        *,
        heads: Iterable[Sequence[int]] | None = None,
        alpha: float = 1.0,
    ) -> "FocusDirections":
        """Import the reference code's ``head_q_directions_{l}.pth`` files (``[n_heads, d_head]`` per layer).

        Key files (``head_k_directions_{l}.pth``) are shape-checked and dropped: key-side vectors are
        inert (constant-in-j logit terms). Files are read with ``torch.load(weights_only=True)``.
        ``heads`` restricts to a subset (default: every head of every layer found).
        """
        folder = Path(folder)
        info = model_info(model)
        vecs: dict[Head, Tensor] = {}
        layers = []
        n_key = 0
        for l in range(info.n_layers):
            f = folder / f"head_q_directions_{l}.pth"
            if not f.exists():
                continue
            t = torch.as_tensor(torch.load(f, map_location="cpu", weights_only=True)).float()
            if t.shape != (info.n_heads, info.d_head):
                raise ValueError(f"{f.name} has shape {tuple(t.shape)}; expected [n_heads, d_head] = "
                                 f"[{info.n_heads}, {info.d_head}] for this model.")
            layers.append(l)
            for h in range(info.n_heads):
                vecs[(l, h)] = t[h]
            fk = folder / f"head_k_directions_{l}.pth"
            if fk.exists():
                tk = torch.as_tensor(torch.load(fk, map_location="cpu", weights_only=True))
                if tk.shape[-1] != info.d_head:
                    raise ValueError(f"{fk.name} has shape {tuple(tk.shape)}; expected last dim {info.d_head}.")
                n_key += 1
        if not vecs:
            raise FileNotFoundError(f"No head_q_directions_{{layer}}.pth files in {folder}.")
        hs = list(vecs) if heads is None else check_heads(model, heads)
        missing = [h for h in hs if h not in vecs]
        if missing:
            raise ValueError(f"No imported direction for heads {missing}; layers found: {layers}.")
        return cls(heads=hs, vectors=torch.stack([vecs[h] for h in hs]),
                   fingerprint=info.fingerprint(), model_name=info.name, site=query_site(model),
                   alpha=alpha, objective="authors",
                   training={"source": str(folder), "layers": layers, "key_files_ignored": n_key,
                             "note": "key-side vectors are inert and were not imported"})


def random_like(directions: FocusDirections, *, seed: int = 0) -> FocusDirections:
    """Random directions on the same heads with the same per-head norms (the matched-norm control)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(directions.vectors.shape, generator=g, dtype=torch.float32).to(directions.vectors)
    r = r / r.norm(dim=-1, keepdim=True) * directions.norms()[:, None]
    return directions._replace(vectors=r, objective="random", training={"control_of": directions.objective,
                                                                         "seed": seed})


# --------------------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------------------


@dataclass
class DirectionExample:
    """One training example: the full prompt with a response appended, and the relevant span.

    ``prompt.spans["response"]`` gives the rows R; ``relevant`` the columns C.
    """

    prompt: LabelledPrompt
    relevant: Span

    def __post_init__(self) -> None:
        n = len(self.prompt)
        self.relevant = as_span(self.relevant, seq_len=n, name="relevant span")
        r = as_span(self.prompt.response, seq_len=n, name="response span")
        if self.relevant.end > r.start:
            raise ValueError(f"The relevant span {self.relevant} must lie before the response {r}.")


def make_direction_examples(
    model: HookedModel,
    examples: Sequence[Any],
    *,
    responses: Sequence[str | Sequence[int]] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    chat: bool = True,
) -> list[DirectionExample]:
    """The paper's training data: the gold-only prompt's response appended to the full prompt.

    Args:
        examples: :class:`focuslens.tasks.TaskExample` records with a gold document.
        responses: per example, text or token ids to append instead of generating (e.g. cached
            gold-only responses, or the gold answer sentence for ``objective="likelihood"``).
        max_new_tokens: greedy generation length when ``responses`` is None.
    """
    from .tasks import render

    if responses is not None and len(responses) != len(examples):
        raise ValueError(f"Got {len(responses)} responses for {len(examples)} examples.")
    out = []
    for i, ex in enumerate(examples):
        full = render(ex, model.tokenizer, variant="original", chat=chat)
        if full.relevant is None:
            raise ValueError(f"Example {i} has no gold document: focus directions need a relevant span.")
        if responses is not None:
            resp = responses[i]
        else:
            gold = render(ex, model.tokenizer, variant="gold_only", chat=chat)
            resp = generate_response(model, gold.prompt.tokens, max_new_tokens=max_new_tokens).tolist()
        if (isinstance(resp, str) and not resp.strip()) or (not isinstance(resp, str) and len(resp) == 0):
            continue  # an empty gold-only answer gives no response rows
        out.append(DirectionExample(full.prompt.with_response(model.tokenizer, resp), full.relevant))
    if not out:
        raise ValueError("No usable training example (all responses were empty).")
    return out


# --------------------------------------------------------------------------------------------------
# Cached q/k for the attention objective
# --------------------------------------------------------------------------------------------------


@dataclass
class QKCache:
    """Frozen-model queries (response rows) and keys (all positions) of the selected heads.

    ``logits0[i]`` is ``[S, R_i, N_i]``: ``scale · q_t·k_j`` for the selected heads, response rows,
    causal-masked (j > t set to a large negative). ``keys[i]`` is ``[U, N_i, d]`` for the U distinct
    ``(layer, kv_head)`` pairs; ``kv_index[s]`` says which one head s uses (GQA). ``queries[i]`` is
    ``[S, R_i, d]``.
    """

    heads: list[Head]
    kv_pairs: list[tuple[int, int]]
    kv_index: Int[Tensor, "S"]
    scale: float
    queries: list[Tensor]
    keys: list[Tensor]
    logits0: list[Tensor]
    relevant: list[Tensor]  # [N_i] bool
    sink: list[Tensor]  # [N_i] bool: position 0

    def __len__(self) -> int:
        return len(self.logits0)


def cache_qk(
    model: HookedModel,
    examples: Sequence[DirectionExample],
    heads: Sequence[Sequence[int]],
    *,
    progress: bool = False,
) -> QKCache:
    """One frozen forward pass per example; keep only what the attention objective needs.

    The forward pass stops after the last selected layer (nothing downstream is needed).
    """
    heads = check_heads(model, heads)
    info = model_info(model)
    qs, ks = query_site(model), _key_site(model)
    scale = attention_scale(model, heads[0][0])
    kv_pairs = sorted({(l, info.kv_head(h)) for l, h in heads})
    kv_index = torch.tensor([kv_pairs.index((l, info.kv_head(h))) for l, h in heads])
    by_layer: dict[int, list[int]] = defaultdict(list)
    for l, h in heads:
        by_layer[l].append(h)
    last = max(by_layer)
    out = QKCache(list(heads), kv_pairs, kv_index, scale, [], [], [], [], [])

    class _Stop(Exception):
        pass

    it = examples
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(examples, desc="caching q/k", leave=False)
    for ex in it:
        store: dict[str, Tensor] = {}

        def make_grab(name):  # keyed by the requested name: hook.name may be an alias (GPT-2)
            def grab(x, hook):
                store[name] = x[0].detach()  # [pos, H or G, d]
                if name == hook_name(last, ks):
                    raise _Stop()
                return x

            return grab

        hooks = []
        for l in sorted(by_layer):
            hooks += [(hook_name(l, qs), make_grab(hook_name(l, qs))), (hook_name(l, ks), make_grab(hook_name(l, ks)))]
        r = ex.prompt.response
        with attach_hooks(model, hooks, label="focus directions: cache q/k"), torch.no_grad():
            try:
                model(ex.prompt.tokens[None])
            except _Stop:
                pass
        n = r.end
        q = torch.stack([store[hook_name(l, qs)][r.start:r.end, h] for l, h in heads])  # [S, R, d]
        k = torch.stack([store[hook_name(l, ks)][:n, g] for l, g in kv_pairs])  # [U, N, d]
        if q.shape[-1] != info.d_head:
            raise RuntimeError(f"Unexpected query shape {tuple(q.shape)} at {qs}.")
        lg = torch.einsum("srd,snd->srn", q.float(), k.float()[kv_index]) * scale
        rows = torch.arange(r.start, r.end)[:, None]
        cols = torch.arange(n)[None, :]
        lg = lg.masked_fill((cols > rows)[None], _NEG)
        rel = torch.zeros(n, dtype=torch.bool)
        rel[ex.relevant.slice] = True
        sink = torch.zeros(n, dtype=torch.bool)
        sink[0] = True
        out.queries.append(q.float())
        out.keys.append(k.float())
        out.logits0.append(lg)
        out.relevant.append(rel)
        out.sink.append(sink)
    return out


def attention_mass(
    logits0: Float[Tensor, "S R N"],
    keys: Float[Tensor, "S N d"],
    relevant: Float[Tensor, "N"] | Tensor,
    u_q: Float[Tensor, "S d"] | None,
    *,
    scale: float,
    queries: Float[Tensor, "S R d"] | None = None,
    u_k: Float[Tensor, "S d"] | None = None,
) -> Float[Tensor, "S"]:
    """Mean over response rows of the attention mass on the ``relevant`` columns, per head.

    ``softmax_j(logits0 + scale·u_q·k_j)`` summed over j ∈ C, averaged over rows. With ``u_k`` (the
    authors' key-side vector) the logits become ``scale·(q_t+u_q)·(k_j+u_k)`` — needs ``queries`` —
    and the result is the same up to rounding: the extra terms are constant in j.
    """
    bias = torch.zeros(logits0.shape[0], logits0.shape[-1], dtype=logits0.dtype, device=logits0.device)
    if u_q is not None:
        bias = torch.einsum("sd,snd->sn", u_q, keys) * scale
    lg = logits0 + bias[:, None, :]
    if u_k is not None:
        if queries is None:
            raise ValueError("u_k needs the raw queries.")
        qq = queries + (u_q[:, None, :] if u_q is not None else 0)
        lg = lg + (torch.einsum("srd,sd->sr", qq, u_k) * scale)[:, :, None]
    p = torch.softmax(lg, dim=-1)
    return (p * relevant.to(p.dtype)[None, None, :]).sum(-1).mean(-1)


def _pad_batch(cache: QKCache, idx: Sequence[int], column: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pad examples ``idx`` into one batch: logits0 ``[B,S,R,N]``, per-head keys ``[S,B,N,d]`` (GQA
    expanded; head-major so that the bias ``K·u`` is one batched matmul with no copy), column mask
    ``[B,N]``, row mask ``[B,R]``. Built once per chunk and reused every step."""
    n_max = max(cache.logits0[i].shape[-1] for i in idx)
    r_max = max(cache.logits0[i].shape[1] for i in idx)
    S, d = len(cache.heads), cache.keys[0].shape[-1]
    B = len(idx)
    lg = torch.full((B, S, r_max, n_max), _NEG)
    K = torch.zeros(S, B, n_max, d)
    cmask = torch.zeros(B, n_max)
    rmask = torch.zeros(B, r_max)
    cols = cache.relevant if column == "relevant" else cache.sink
    for b, i in enumerate(idx):
        _, r, n = cache.logits0[i].shape
        lg[b, :, :r, :n] = cache.logits0[i]
        K[:, b, :n] = cache.keys[i][cache.kv_index]
        cmask[b, :n] = cols[i].float()
        rmask[b, :r] = 1.0
    return lg, K, cmask, rmask


def _mass_from_batch(batch: tuple[Tensor, Tensor, Tensor, Tensor], u: Tensor, scale: float) -> Tensor:
    lg, K, cmask, rmask = batch
    S, B, N, d = K.shape
    # [S, B·N, d] @ [S, d, 1]: 3-4× faster than the einsum over a [B, S, N, d] layout (which copies K)
    bias = torch.bmm(K.view(S, B * N, d), u[:, :, None].to(K.dtype)).view(S, B, N).permute(1, 0, 2) * scale
    p = torch.softmax(lg + bias[:, :, None, :], dim=-1)
    mass = (p * cmask[:, None, None, :]).sum(-1)  # [B, S, R]
    per = (mass * rmask[:, None, :]).sum(-1) / rmask.sum(-1)[:, None]  # [B, S]
    return per.mean(0)


def _batched_mass(cache: QKCache, idx: Sequence[int], u: Tensor, *, column: str = "relevant") -> Tensor:
    """Per-head mass ``[S]`` averaged over examples ``idx`` (padded into one batch)."""
    return _mass_from_batch(_pad_batch(cache, idx, column), u, cache.scale)


def heldout_attention(cache: QKCache, directions: FocusDirections | Tensor | None, *, alpha: float = 1.0,
                      chunk: int = 64, column: Literal["relevant", "sink"] = "relevant") -> Float[Tensor, "S"]:
    """Mean response-row attention mass on the relevant span (or the sink), per head, under ``α·u``."""
    S, d = len(cache.heads), cache.keys[0].shape[-1]
    if directions is None:
        u = torch.zeros(S, d)
    elif isinstance(directions, FocusDirections):
        u = directions.select(cache.heads).vectors.float()
    else:
        u = torch.as_tensor(directions).float()
    tot = torch.zeros(S)
    with torch.no_grad():
        for a in range(0, len(cache), chunk):
            idx = list(range(a, min(a + chunk, len(cache))))
            tot += _batched_mass(cache, idx, alpha * u, column=column) * len(idx)
    return tot / len(cache)


def _project(u: Tensor, max_norm: Tensor | None) -> None:
    if max_norm is None:
        return
    with torch.no_grad():
        n = u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        u.mul_(torch.clamp(max_norm[:, None] / n, max=1.0))


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _resolve_max_norm(max_norm, cache: QKCache | None, S: int) -> Tensor | None:
    if max_norm is None:
        return None
    if max_norm == "query":
        if cache is None:
            raise ValueError("max_norm='query' needs cached queries; give a number instead.")
        return torch.stack([q.norm(dim=-1).mean(-1) for q in cache.queries]).mean(0)  # [S]
    return torch.full((S,), float(max_norm))


def train_focus_directions(
    model: HookedModel,
    examples: Sequence[DirectionExample],
    *,
    heads: Sequence[Sequence[int]],
    objective: Objective = "attention",
    method: Method = "batched",
    val_examples: Sequence[DirectionExample] | None = None,
    alpha: float = 1.0,
    lr: float | None = None,
    steps: int = 300,
    epochs: int | None = None,
    init_std: float = 0.01,
    max_norm: float | Literal["query"] | None = "query",
    weight_decay: float | None = None,
    patience: int | None = None,
    eval_every: int = 10,
    live_eval_every: int | None = None,
    attention_weight: float = 1.0,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    caches: tuple[QKCache, QKCache | None] | None = None,
) -> FocusDirections:
    """Learn one query vector per head; return :class:`FocusDirections` (heads in the order given).

    Args:
        heads: ``(layer, head)`` pairs, e.g. the top-k contextual heads (rank order is kept, so
            ``.top(k)`` of the result is the top-k subset) or all heads of chosen layers.
        objective: ``"attention"`` (paper; cached q/k), ``"likelihood"`` (live model, response
            log-likelihood) or ``"both"`` (likelihood + ``attention_weight`` × live attention mass).
        method: attention objective only. ``"batched"``: all heads jointly, full-batch Adam for
            ``steps`` steps (default lr 0.05). ``"per_layer"``: the authors' loop, one layer at a time,
            batch 1, AdamW (lr 1e-3, weight decay 0.01) for ``epochs`` (default 10) — the reference.
        val_examples: held-out examples for early stopping (best validation objective is kept) and
            for the before/after report in ``.training``.
        alpha: the α used in training (the paper trains with α = 1).
        lr: learning rate (defaults: batched 0.05; per_layer 1e-3; likelihood/both 1e-2).
        steps: full-batch steps (batched attention). ``epochs``: passes over the data for per_layer
            (default 10) and the live objectives (default 5).
        init_std: initialisation N(0, init_std²) (paper: 0.01).
        max_norm: norm limit per head after each step: a number, ``"query"`` (the mean norm of that
            head's cached response-row queries, i.e. α=1 never outweighs the query itself; needs the
            attention cache, so for live objectives it is computed from one cache pass) or None.
        patience: early stopping after this many evaluations without improvement (None: never).
        eval_every: batched attention objective: validate every this many steps.
        live_eval_every: live objectives: also validate every this many training examples (``None``:
            once per epoch only). With one epoch over a few hundred examples this is what gives
            early stopping and the best-on-validation vectors.
        checkpoint_dir: live objectives only: the state is written there after every epoch and a
            rerun resumes from it.
        caches: precomputed ``(train_cache, val_cache)`` from :func:`cache_qk` (attention objective).
    """
    if objective not in ("attention", "likelihood", "both"):
        raise ValueError(f"objective must be 'attention', 'likelihood' or 'both'; got {objective!r}.")
    if method not in ("batched", "per_layer"):
        raise ValueError(f"method must be 'batched' or 'per_layer'; got {method!r}.")
    heads = check_heads(model, heads)
    if not examples:
        raise ValueError("No training examples.")
    info = model_info(model)
    torch.manual_seed(seed)
    t0 = time.time()
    if caches is None and (objective == "attention" or max_norm == "query"):
        tr = cache_qk(model, examples, heads, progress=progress)
        va = cache_qk(model, val_examples, heads, progress=progress) if val_examples else None
    elif caches is not None:
        tr, va = caches
        if tr.heads != list(heads):
            raise ValueError("The given caches were built for other heads.")
    else:
        tr = va = None
    limit = _resolve_max_norm(max_norm, tr, len(heads))
    g = torch.Generator().manual_seed(seed)
    u0 = torch.randn(len(heads), info.d_head, generator=g) * init_std
    summary: dict[str, Any] = {
        "objective": objective, "method": method if objective == "attention" else "live", "alpha": alpha,
        "n_train": len(examples), "n_val": len(val_examples or []), "seed": seed, "init_std": init_std,
        "max_norm": max_norm if not isinstance(max_norm, Tensor) else "tensor",
        "response_tokens_mean": sum(len(e.prompt.response) for e in examples) / len(examples),
        "prompt_tokens_mean": sum(len(e.prompt) for e in examples) / len(examples),
    }
    if objective == "attention":
        if method == "batched":
            u, hist = _train_batched(tr, va, u0, lr=lr or 0.05, steps=steps, alpha=alpha, limit=limit,
                                     patience=patience, eval_every=eval_every, progress=progress,
                                     weight_decay=weight_decay or 0.0)
            summary.update(lr=lr or 0.05, steps=steps)
        else:
            u, hist = _train_per_layer(tr, u0, lr=lr or 1e-3, epochs=epochs or 10, alpha=alpha, limit=limit,
                                       seed=seed, progress=progress,
                                       weight_decay=0.01 if weight_decay is None else weight_decay)
            summary.update(lr=lr or 1e-3, epochs=epochs or 10)
    else:
        u, hist = _train_live(model, examples, val_examples, heads, u0, objective=objective, alpha=alpha,
                              lr=lr or 1e-2, epochs=epochs or 5, limit=limit, patience=patience,
                              attention_weight=attention_weight, seed=seed, progress=progress,
                              checkpoint_dir=checkpoint_dir, weight_decay=weight_decay or 0.0,
                              eval_every=live_eval_every)
        summary.update(lr=lr or 1e-2, epochs=epochs or 5, attention_weight=attention_weight)
    summary["train_seconds"] = round(time.time() - t0, 2)
    summary["history"] = hist
    if va is not None:
        before = heldout_attention(va, None)
        after = heldout_attention(va, u, alpha=alpha)
        summary["heldout_relevant_attention_before"] = round(float(before.mean()), 5)
        summary["heldout_relevant_attention_after"] = round(float(after.mean()), 5)
        summary["heldout_relevant_attention_per_head_after"] = [round(float(x), 4) for x in after]
    return FocusDirections(heads=list(heads), vectors=u.detach().clone(), fingerprint=info.fingerprint(),
                           model_name=info.name, site=query_site(model), alpha=alpha, objective=objective,
                           training=summary)


def _train_batched(tr: QKCache, va: QKCache | None, u0: Tensor, *, lr, steps, alpha, limit, patience,
                   eval_every, progress, weight_decay, chunk: int = 64):
    u = u0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([u], lr=lr, weight_decay=weight_decay)
    _project(u, limit)
    best_u, best_val, bad = u.detach().clone(), -math.inf, 0
    hist: list[dict] = []
    it = range(steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        it = bar = tqdm(it, desc="focus directions (attention, batched)", leave=False)
    n = len(tr)
    batches = [(len(idx), _pad_batch(tr, idx, "relevant"))
               for idx in (list(range(a, min(a + chunk, n))) for a in range(0, n, chunk))]
    vbatches = [] if va is None else [
        (len(idx), _pad_batch(va, idx, "relevant"))
        for idx in (list(range(a, min(a + chunk, len(va)))) for a in range(0, len(va), chunk))]
    for step in it:
        opt.zero_grad()
        tot = 0.0
        for nb, batch in batches:
            mass = _mass_from_batch(batch, alpha * u, tr.scale)  # [S]
            loss = -(mass.sum()) * nb / n  # heads independent: sum keeps each head's own gradient
            loss.backward()
            tot += float(loss.detach())
        opt.step()
        _project(u, limit)
        if (step + 1) % eval_every == 0 or step == steps - 1:
            rec = {"step": step + 1, "train_mass": -tot / len(tr.heads)}
            if va is not None:
                with torch.no_grad():
                    v = float(sum(_mass_from_batch(b_, alpha * u.detach(), va.scale) * nb_
                                  for nb_, b_ in vbatches).mean() / len(va))
                rec["val_mass"] = v
                if v > best_val + 1e-6:
                    best_val, best_u, bad = v, u.detach().clone(), 0
                else:
                    bad += 1
            hist.append(rec)
            if bar is not None:
                bar.set_postfix({k: round(x, 4) for k, x in rec.items() if k != "step"})
            if va is not None and patience is not None and bad >= patience:
                break
    return (best_u if va is not None else u.detach()), hist


def _train_per_layer(tr: QKCache, u0: Tensor, *, lr, epochs, alpha, limit, seed, progress, weight_decay):
    """The authors' procedure: per layer, batch 1 AdamW over examples, ``epochs`` passes."""
    u_all = u0.clone()
    layers = sorted({l for l, _ in tr.heads})
    hist = []
    rng = random.Random(seed)
    total = len(layers) * epochs * len(tr)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="focus directions (per layer, batch 1)", leave=False)
    for l in layers:
        sel = [i for i, (ll, _) in enumerate(tr.heads) if ll == l]
        u = u_all[sel].clone().requires_grad_(True)
        opt = torch.optim.AdamW([u], lr=lr, weight_decay=weight_decay)
        kv = tr.kv_index[sel]
        lim = limit[sel] if limit is not None else None
        for ep in range(epochs):
            order = list(range(len(tr)))
            rng.shuffle(order)
            for i in order:
                opt.zero_grad()
                mass = attention_mass(tr.logits0[i][sel], tr.keys[i][kv], tr.relevant[i], alpha * u,
                                      scale=tr.scale)
                (-mass.sum()).backward()
                opt.step()
                _project(u, lim)
                if bar is not None:
                    bar.update(1)
            hist.append({"layer": l, "epoch": ep + 1})
        u_all[sel] = u.detach()
    if bar is not None:
        bar.close()
    return u_all, hist


def _live_forward(model, ex: DirectionExample, heads: list[Head], u: Tensor, alpha: float, *,
                  want_attention: bool, scale: float) -> tuple[Tensor, Tensor | None]:
    """NLL of the response tokens (mean) and the selected heads' mean mass on C, with α·u injected."""
    info = model_info(model)
    qs, ks = query_site(model), _key_site(model)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for i, (l, h) in enumerate(heads):
        by_layer[l].append(i)
    stash: dict[str, Tensor] = {}
    hooks = []
    r = ex.prompt.response
    for l, rows in by_layer.items():
        hidx = torch.tensor([heads[i][1] for i in rows])
        ridx = torch.tensor(rows)

        def add(x, hook, hidx=hidx, ridx=ridx, name=hook_name(l, qs)):
            delta = torch.zeros(x.shape[-2], x.shape[-1], dtype=x.dtype, device=x.device)
            delta = delta.index_put((hidx.to(x.device),), (alpha * u[ridx]).to(x.dtype))
            y = x + delta
            if want_attention:
                stash[name] = y
            return y

        hooks.append((hook_name(l, qs), add))
        if want_attention:
            def keep(x, hook, name=hook_name(l, ks)):
                stash[name] = x
                return x

            hooks.append((hook_name(l, ks), keep))
    with attach_hooks(model, hooks, label="focus directions: live training"):
        logits = model(ex.prompt.tokens[None])  # [1, pos, vocab]
    tgt = ex.prompt.tokens[r.start:r.end].to(logits.device)
    lp = torch.log_softmax(logits[0, r.start - 1:r.end - 1].float(), dim=-1)
    nll = -lp.gather(-1, tgt[:, None]).mean()
    if not want_attention:
        return nll, None
    masses: list[Tensor | None] = [None] * len(heads)  # in ``heads`` order
    n = r.end
    for l, rows in by_layer.items():
        q = stash[hook_name(l, qs)][0, r.start:r.end]  # [R, H, d]
        k = expand_kv(stash[hook_name(l, ks)][0, :n], info.n_heads, head_dim=1)  # [N, H, d]
        for i in rows:
            h = heads[i][1]
            lg = (q[:, h] @ k[:, h].T) * scale
            t = torch.arange(r.start, r.end)[:, None]
            lg = lg.masked_fill(torch.arange(n)[None] > t, _NEG)
            masses[i] = torch.softmax(lg.float(), -1)[:, ex.relevant.slice].sum(-1).mean()
    return nll, torch.stack(masses)  # type: ignore[arg-type]


def _train_live(model, examples, val_examples, heads, u0, *, objective, alpha, lr, epochs, limit, patience,
                attention_weight, seed, progress, checkpoint_dir, weight_decay, eval_every=None):
    want_att = objective == "both"
    scale = attention_scale(model, heads[0][0])
    u = u0.clone().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=lr, weight_decay=weight_decay)
    _project(u, limit)
    start_epoch, best_u, best_val, bad, hist = 0, u.detach().clone(), math.inf, 0, []
    ck = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ck is not None and (ck / "state.pt").exists():
        st = torch.load(ck / "state.pt", weights_only=False)
        if st["heads"] != [list(h) for h in heads] or st["objective"] != objective:
            raise ValueError(f"The checkpoint in {ck} is for other heads/objective; use another folder.")
        with torch.no_grad():
            u.copy_(st["u"])
        opt.load_state_dict(st["opt"])
        start_epoch, best_u, best_val, bad, hist = st["epoch"], st["best_u"], st["best_val"], st["bad"], st["hist"]

    def objective_value(ex):
        nll, mass = _live_forward(model, ex, heads, u, alpha, want_attention=want_att, scale=scale)
        loss = nll if mass is None else nll - attention_weight * mass.mean()
        return loss, nll

    def validate():
        if not val_examples:
            return None
        with torch.no_grad():
            return sum(float(objective_value(ex)[0]) for ex in val_examples) / len(val_examples)

    if start_epoch == 0 and val_examples:
        v0 = validate()
        hist.append({"epoch": 0, "val_loss": v0})
        best_val = v0
    for ep in range(start_epoch, epochs):
        if patience is not None and bad >= patience:
            break
        order = list(range(len(examples)))
        random.Random(seed + ep).shuffle(order)
        it = order
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(order, desc=f"focus directions ({objective}) epoch {ep + 1}/{epochs}", leave=False)
        tot = 0.0
        stopped = False
        for step, i in enumerate(it, start=1):
            opt.zero_grad()
            loss, _ = objective_value(examples[i])
            loss.backward()
            opt.step()
            _project(u, limit)
            tot += float(loss.detach())
            if eval_every and val_examples and step % eval_every == 0 and step < len(order):
                v = validate()
                hist.append({"epoch": ep + step / len(order), "val_loss": v})
                if v < best_val - 1e-6:
                    best_val, best_u, bad = v, u.detach().clone(), 0
                else:
                    bad += 1
                if patience is not None and bad >= patience:
                    stopped = True
                    break
        rec = {"epoch": ep + 1, "train_loss": tot / max(step, 1)}
        if stopped:
            rec["early_stop"] = True
        v = validate()
        if v is not None:
            rec["val_loss"] = v
            if v < best_val - 1e-6:
                best_val, best_u, bad = v, u.detach().clone(), 0
            else:
                bad += 1
        else:
            best_u = u.detach().clone()
        hist.append(rec)
        if ck is not None:
            ck.mkdir(parents=True, exist_ok=True)
            tmp = ck / "state.pt.tmp"
            torch.save({"u": u.detach(), "opt": opt.state_dict(), "epoch": ep + 1, "best_u": best_u,
                        "best_val": best_val, "bad": bad, "hist": hist,
                        "heads": [list(h) for h in heads], "objective": objective}, tmp)
            os.replace(tmp, ck / "state.pt")
    return best_u, hist


# --------------------------------------------------------------------------------------------------
# Magnitude control (this project's own design)
# --------------------------------------------------------------------------------------------------


def _sink_curves(
    model: HookedModel,
    directions: FocusDirections,
    tokens: Int[Tensor, "pos"] | LabelledPrompt,
    alphas: Float[Tensor, "A"],
    rows: int = 1,
) -> Float[Tensor, "n A"]:
    """Sink mass of the last ``rows`` prompt rows of each selected head at each α, from one probe pass.

    ``s_h(α) = mean_t softmax_j(scale·(q_t·k_j + α·u_h·k_j))_0`` in closed form from the cached post-RoPE
    queries and keys (the pass stops after the last selected layer). Exact for one head in isolation; the
    heads' effects on later layers are not included (that is what makes it one pass).
    """
    toks = tokens.tokens if isinstance(tokens, LabelledPrompt) else torch.as_tensor(tokens)
    n = int(toks.shape[-1])
    rows = min(rows, n)
    info = model_info(model)
    heads = directions.heads
    qs, ks = query_site(model), _key_site(model)
    layers = sorted({l for l, _ in heads})
    store: dict[str, Tensor] = {}

    class _Stop(Exception):
        pass

    def make_grab(name):  # keyed by the requested name: hook.name may be an alias (GPT-2)
        def grab(x, hook):
            store[name] = x[0].detach()
            if name == hook_name(layers[-1], ks):
                raise _Stop()
            return x

        return grab

    hooks = [(hook_name(l, s), make_grab(hook_name(l, s))) for l in layers for s in (qs, ks)]
    with attach_hooks(model, hooks, label="focus directions: sink probe"), torch.no_grad():
        try:
            model(toks.reshape(1, -1))
        except _Stop:
            pass
    scale = attention_scale(model, layers[0])
    out = torch.zeros(len(heads), alphas.numel())
    for i, (l, h) in enumerate(heads):
        q = store[hook_name(l, qs)][n - rows:, h].float()  # [r, d]
        k = store[hook_name(l, ks)][:, info.kv_head(h)].float()  # [N, d]
        u = directions.vectors[i].float().to(q.device)
        base = (q @ k.T) * scale  # [r, N]; rows are the last ones, so every key is causal-visible
        t = torch.arange(n - rows, n)[:, None]
        base = base.masked_fill(torch.arange(n)[None] > t, _NEG)
        bias = (k @ u) * scale  # [N]
        lg = base[None] + alphas.to(base)[:, None, None] * bias[None, None, :]  # [A, r, N]
        out[i] = torch.softmax(lg, -1)[..., 0].mean(-1).cpu()
    return out


def sink_target_alphas(
    model: HookedModel,
    directions: FocusDirections,
    tokens: Int[Tensor, "pos"] | LabelledPrompt,
    *,
    target: float = 0.5,
    alpha_max: float = 4.0,
    rows: int = 1,
    grid: int = 81,
    per: Literal["head", "input"] = "head",
) -> Float[Tensor, "n"]:
    """α per head such that the last prompt row(s)' attention on the sink falls by ``target``.

    **This project's own design** (the revised paper's controller is not public). One probe pass over
    the prompt caches the selected heads' post-RoPE queries of the last ``rows`` rows and all keys;
    the sink mass ``s(α) = softmax_j(scale·(q_t·k_j + α·u·k_j))_0`` is evaluated on a grid of
    α ∈ [0, alpha_max] and the smallest α with ``s(α) ≤ (1 − target)·s(0)`` is chosen (the α minimising
    s when no grid value reaches the target). Focus directions move attention off the sink; this keeps
    that move in a fixed proportion per input instead of one global α.

    * ``per="head"``: each head gets its own α (its own sink falls by ``target``).
    * ``per="input"``: one α for all heads, from the heads' *mean* sink mass. It keeps the learned
      relative magnitudes between heads (directions trained jointly, e.g. with the likelihood
      objective, rely on them) and only adapts the overall strength to the input. Pair it with
      :func:`calibrate_sink_target`, which reads the target off the α chosen on validation.

    Costs one forward pass (stopped after the last selected layer). No labels.

    Returns:
        ``[n_heads]`` α per head, in ``directions.heads`` order (all equal for ``per="input"``).
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target is the fraction of sink mass to remove, in (0, 1); got {target}.")
    if per not in ("head", "input"):
        raise ValueError(f"per must be 'head' or 'input', got {per!r}.")
    alphas = torch.linspace(0.0, alpha_max, grid)  # [A]
    s = _sink_curves(model, directions, tokens, alphas, rows)  # [n, A]
    if per == "input":
        s = s.mean(0, keepdim=True)
    out = torch.zeros(s.shape[0])
    for i in range(s.shape[0]):
        ok = torch.nonzero(s[i] <= (1.0 - target) * s[i, 0]).flatten()
        out[i] = alphas[ok[0]] if ok.numel() else alphas[torch.argmin(s[i])]
    return out.expand(len(directions.heads)).clone() if per == "input" else out


def calibrate_sink_target(
    model: HookedModel,
    directions: FocusDirections,
    prompts: Sequence[Int[Tensor, "pos"] | LabelledPrompt],
    *,
    alpha: float,
    rows: int = 1,
) -> float:
    """The mean fraction of sink mass that ``alpha`` removes, over (unlabelled) validation prompts.

    ``target = mean_prompts [1 − s̄(α) / s̄(0)]`` with ``s̄`` the selected heads' mean last-row sink mass
    (:func:`sink_target_alphas` with ``per="input"``). Using it as the magnitude control's target makes
    ``alpha="auto"`` move, on every input, as much attention off the sink as the validated fixed α does
    on average — more α where the directions act weakly, less where they overshoot. No labels and no
    accuracy grid: only the α already chosen on validation and one probe pass per prompt.
    """
    if not prompts:
        raise ValueError("calibrate_sink_target needs at least one prompt.")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (the validated fixed α), got {alpha}.")
    a = torch.tensor([0.0, float(alpha)])
    drops = []
    for p in prompts:
        s = _sink_curves(model, directions, p, a, rows).mean(0)  # [2]
        drops.append(float(1.0 - s[1] / s[0]) if s[0] > 0 else 0.0)
    t = sum(drops) / len(drops)
    return min(max(t, 1e-3), 1.0 - 1e-3)


# --------------------------------------------------------------------------------------------------
# Choosing k, α and the magnitude-control target on a validation split
# --------------------------------------------------------------------------------------------------


@dataclass
class AlphaSelection:
    """What :func:`select_alpha` measured and chose.

    Attributes:
        k, alpha: the chosen number of top heads and fixed α (``alpha`` is ``"auto"`` when the
            magnitude control won and ``prefer_fixed`` is False).
        target: the best magnitude-control target (``None`` when no target was tried).
        baseline: validation accuracy of the unmodified model.
        rows: one dict per configuration: ``k``, ``alpha`` (number or ``"auto"``), ``target``,
            ``accuracy``, ``stderr``, ``distractor_copy``, ``n``.
    """

    k: int
    alpha: float | str
    target: float | None
    baseline: float
    rows: list[dict[str, Any]]

    @property
    def best_fixed(self) -> dict[str, Any]:
        """The best row with a fixed positive α (what was chosen unless the magnitude control won)."""
        return max((r for r in self.rows if r["alpha"] != "auto" and r["alpha"] > 0), key=_selection_key)

    def table(self) -> str:
        """The grid as markdown (validation accuracy ± binomial standard error)."""
        lines = ["| k | α | target | n | accuracy | distractor copy |", "|---|---|---|---|---|---|",
                 f"| – | 0 (unmodified) | – | {self.rows[0]['n'] if self.rows else 0} | {self.baseline:.3f} | – |"]
        for r in self.rows:
            t = "–" if r["target"] is None else f"{r['target']:g}"
            a = r["alpha"] if isinstance(r["alpha"], str) else f"{r['alpha']:g}"
            lines.append(f"| {r['k']} | {a} | {t} | {r['n']} | {r['accuracy']:.3f} ± {r['stderr']:.3f} | "
                         f"{r['distractor_copy']:.2f} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "alpha": self.alpha, "target": self.target, "baseline": self.baseline,
                "rows": self.rows}


def _selection_key(r: Mapping[str, Any]) -> tuple:
    # best accuracy; ties → the weaker intervention (smaller |α|, then fewer heads)
    a = 0.0 if r["alpha"] == "auto" else abs(float(r["alpha"]))
    return (round(float(r["accuracy"]), 9), -a, -int(r["k"]))


def select_alpha(
    model: HookedModel,
    directions: FocusDirections,
    examples: Sequence[Any],
    *,
    alphas: Sequence[float] = (0.25, 0.5, 1.0, 2.0),
    ks: Sequence[int] | None = None,
    targets: Sequence[float] = (),
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
    batch_size: int = 8,
) -> AlphaSelection:
    """Choose k (top heads) and α for ``directions`` by accuracy on validation examples.

    Why: the useful α depends on the objective and the vectors' norms (on SmolLM2, attention-objective
    vectors work at α = 0.5 and break at α = 1, likelihood vectors the other way round), so it must be
    chosen on held-out data — never on the test split. Every ``(k, α)`` in the grid is evaluated with
    greedy decoding and best-subspan EM (:func:`focuslens.evaluation.evaluate`); the best accuracy wins,
    ties going to the smaller |α| and then the smaller k. Then, at the chosen k, each magnitude-control
    ``target`` (``alpha="auto"``, :func:`sink_target_alphas`) is evaluated; the best target is reported
    (it replaces the fixed α only if it is strictly better).

    Args:
        directions: trained directions (heads in rank order, so ``top(k)`` is the top-k subset).
        examples: validation :class:`~focuslens.tasks.TaskExample` records (disjoint from train and test).
        alphas: fixed α values to try (non-zero; negative values are allowed but are never chosen).
        ks: numbers of top heads to try (default: all heads only).
        targets: magnitude-control targets in (0, 1) to try at the chosen k (default: none).
        output_dir: keep one resumable JSONL per configuration there (``None``: in memory).

    Returns:
        An :class:`AlphaSelection` (``.k``, ``.alpha``, ``.target``, ``.table()``).
    """
    from .evaluation import evaluate

    if not examples:
        raise ValueError("select_alpha needs validation examples.")
    alphas = [float(a) for a in alphas]
    if not alphas or any(a == 0 or not math.isfinite(a) for a in alphas):
        raise ValueError(f"alphas must be non-empty, finite and non-zero (α = 0 is the baseline); got {alphas}.")
    if not any(a > 0 for a in alphas):
        raise ValueError(f"select_alpha needs at least one positive α to choose from; got {alphas}.")
    ks = [len(directions)] if ks is None else [int(k) for k in ks]
    for k in ks:
        if not 1 <= k <= len(directions):
            raise ValueError(f"k must be in 1..{len(directions)} (the number of heads with a direction); got {k}.")
    for t in targets:
        if not 0.0 < t < 1.0:
            raise ValueError(f"targets are fractions of sink mass to remove, in (0, 1); got {t}.")
    directions.check_model(model)
    out = Path(output_dir) if output_dir is not None else None

    def run(tag: str, intervene: Any) -> dict[str, Any]:
        res = evaluate(model, examples, max_new_tokens=max_new_tokens, intervene=intervene, progress=progress,
                       output=None if out is None else out / f"{tag}.jsonl", tag=tag, batch_size=batch_size)
        s = res.summary()
        return {"n": s["n"], "accuracy": s["accuracy"], "stderr": s["accuracy_se"],
                "distractor_copy": s["distractor_copy"]}

    baseline = run("unmodified", None)["accuracy"]
    rows: list[dict[str, Any]] = []
    for k in ks:
        dk = directions.top(k)
        for a in alphas:
            with dk.apply(model, alpha=a) as h:
                rows.append({"k": k, "alpha": a, "target": None, **run(f"k{k}_a{a:g}", h)})
    best = max((r for r in rows if r["alpha"] > 0), key=_selection_key)
    k, alpha, target = best["k"], best["alpha"], None
    if targets:
        dk = directions.top(k)
        auto = []
        for t in targets:
            auto.append({"k": k, "alpha": "auto", "target": float(t), **run(
                f"k{k}_auto{t:g}", lambda r, t=t: dk.apply(model, alpha="auto", tokens=r.prompt.tokens, target=t))})
        rows += auto
        best_auto = max(auto, key=lambda r: (round(r["accuracy"], 9), -r["target"]))
        target = best_auto["target"]
        if best_auto["accuracy"] > best["accuracy"]:
            alpha = "auto"
    return AlphaSelection(k=k, alpha=alpha, target=target, baseline=baseline, rows=rows)
