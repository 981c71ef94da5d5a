"""The focus-directions artefact: one query vector per head, its model fingerprint, save/load (SAELens-style folder).

See :mod:`focuslens.directions` for the method. The artefact is a folder with ``directions.safetensors``
and ``config.json``; loading checks the format, the payload checksum (vectors, heads, site and
fingerprint: a flipped byte or hand-swapped heads are refused) and the model fingerprint, and never
unpickles (other files in the folder, such as a planted ``*.pt``, are never read). Saving replaces
the folder atomically under an output lock (:func:`focuslens.core.io.atomic_dir`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.attention import query_site
from ..core.hooks import HookHandle
from ..core.errors import UsageError
from ..core.io import atomic_dir, atomic_write, content_hash, recover_dir, tensor_checksum
from ..core.models import HookedModel, model_info
from ..core.checks import (Head, check_count, check_heads, check_regular_file, check_scaled, frozen_vectors, head_list,
                           read_json, real)
from ..core.prompts import LabelledPrompt
from ..intervene.specs import InterventionSpec, check_batch, format_heads, measuring_model, tokens_of

__all__ = ["FocusDirections", "Steer", "random_like", "WEIGHTS_FILE", "CONFIG_FILE", "FORMAT_VERSION"]

WEIGHTS_FILE = "directions.safetensors"
WEIGHTS_MAX_BYTES = 1 << 32  # 4 GiB: one [d_head] vector per head of any model is far below this
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1

def _versions() -> dict[str, str]:
    """The installed versions of the stack, read from the package metadata (``importlib.metadata``).

    Keys are the import names (``transformer_lens``...); the distribution is looked up under both
    spellings (``transformer-lens`` / ``transformer_lens``), because TransformerLens has no
    ``__version__`` attribute. ``"not installed"`` only when no distribution of that name exists.
    """
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for mod in ("torch", "transformer_lens", "transformers", "safetensors", "focuslens"):
        for dist in dict.fromkeys((mod, mod.replace("_", "-"))):
            try:
                out[mod] = version(dist)
                break
            except PackageNotFoundError:
                continue
        else:  # an uninstalled checkout (focuslens on sys.path only): its own version string
            out[mod] = "not installed"
    if out["focuslens"] == "not installed":
        from ..core.version import __version__ as flv

        out["focuslens"] = flv
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
        what = "FocusDirections"
        self.heads = list(head_list(self.heads, what=what))  # ints only (no bools, no truncated floats), none twice
        try:
            v = torch.as_tensor(self.vectors)
        except (TypeError, ValueError, RuntimeError):
            raise UsageError(f"{what}: vectors must be a [n_heads, d_head] tensor, got "
                             f"{type(self.vectors).__name__}.") from None
        if v.dim() != 2 or v.shape[0] != len(self.heads):
            raise ValueError(
                f"vectors must be [n_heads, d_head] with one row per head ({len(self.heads)} heads); "
                f"got shape {tuple(v.shape)}."
            )
        # the one vector check (real-valued, finite) of every spec: a NaN direction would make every logit NaN
        frozen_vectors({h: v[i] for i, h in enumerate(self.heads)}, what=what)
        if not isinstance(self.fingerprint, Mapping):
            raise UsageError(f"{what}: fingerprint must be model_info(model).fingerprint() (a dict), got "
                             f"{type(self.fingerprint).__name__}.")
        d = self.fingerprint.get("d_head")
        if d is not None and v.shape[1] != d:
            raise ValueError(f"vectors have d_head={v.shape[1]} but the fingerprint says {d}.")
        self.alpha = real(self.alpha, name="alpha", what=what)
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

    def __repr__(self) -> str:
        """One line: model, heads, site, α, objective and the norms' range (not the vectors)."""
        n = self.norms()
        norms = (f"norms {float(n.min()):.3g}–{float(n.max()):.3g} (mean {float(n.mean()):.3g})"
                 if len(n) else "no vectors")
        return (f"FocusDirections({self.model_name or '?'}: {format_heads(self.heads)}, d_head={self.d_head}, "
                f"site={self.site}, α={self.alpha:g}, objective={self.objective}, {norms})")

    def _replace(self, **kw: Any) -> "FocusDirections":
        base = dict(heads=list(self.heads), vectors=self.vectors, fingerprint=dict(self.fingerprint),
                    model_name=self.model_name, site=self.site, alpha=self.alpha,
                    objective=self.objective, training=dict(self.training), versions=dict(self.versions))
        base.update(kw)
        return FocusDirections(**base)

    def top(self, k: int) -> "FocusDirections":
        """The first ``k`` heads (heads are stored in rank order when trained from a ranking)."""
        k = check_count(k, name="k", what="FocusDirections.top(k)", upper=len(self))
        return self._replace(heads=self.heads[:k], vectors=self.vectors[:k].clone())

    def select(self, heads: Iterable[Sequence[int]]) -> "FocusDirections":
        """A subset, in the order given; raises if a head has no direction."""
        hs = list(head_list(heads, what="FocusDirections heads"))  # heads=True or 3.0 is refused, not read
        missing = [h for h in hs if h not in self.heads]
        if missing:
            raise ValueError(f"No direction for heads {missing}; available: {self.heads}.")
        idx = [self.heads.index(h) for h in hs]
        return self._replace(heads=hs, vectors=self.vectors[idx].clone())

    def scaled(self, factors: Float[Tensor, "n"] | Sequence[float]) -> "FocusDirections":
        """Scale each head's vector by its own factor (used by the magnitude control)."""
        try:
            f = torch.as_tensor(factors)
        except (TypeError, ValueError, RuntimeError):
            raise UsageError(f"FocusDirections.scaled: factors must be one number per head, got "
                             f"{type(factors).__name__}.") from None
        if f.dtype == torch.bool or f.is_complex() or not torch.isfinite(f).all():
            raise UsageError(f"FocusDirections.scaled: factors must be finite real numbers (no bools, NaN or inf), "
                             f"got {factors!r}.")
        f = f.to(dtype=self.vectors.dtype, device=self.vectors.device).flatten()
        if f.numel() != len(self):
            raise ValueError(f"Need one factor per head ({len(self)}), got {f.numel()}.")
        return self._replace(vectors=self.vectors * f[:, None])

    # --- arithmetic (repeng style) ---------------------------------------------------------------
    def __mul__(self, c: float) -> "FocusDirections":
        if not isinstance(c, (int, float)):
            return NotImplemented
        c = real(c, name="the factor", what="FocusDirections * c")  # no bool (d * True), no NaN/inf
        check_scaled(self.as_dict(), c, dtype=self.vectors.dtype, what="FocusDirections * c")
        return self._replace(vectors=self.vectors * c, objective=f"{c:g}*({self.objective})")

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> "FocusDirections":
        if not isinstance(c, (int, float)):
            return NotImplemented
        c = real(c, name="the divisor", what="FocusDirections / c")
        if c == 0:
            raise UsageError("FocusDirections / c: the divisor is 0; give a non-zero number.")
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
    def check_applies_to(self, model: HookedModel) -> None:
        """:meth:`check_model` plus the query site: what every application (``apply``, ``Steer``) checks."""
        self.check_model(model)
        expected = query_site(model)
        if self.site != expected:
            raise ValueError(f"Directions were made for {self.site} but this model's query site is {expected}.")

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
        top_k = isinstance(heads, int) and not isinstance(heads, bool)
        spec = Steer(self, alpha=alpha, k=heads if top_k else None, heads=None if top_k else heads,
                     target=target, alpha_max=alpha_max, per=per)
        if spec.alpha == "auto" and tokens is None:
            raise ValueError("alpha='auto' needs the prompt: apply(model, alpha='auto', tokens=prompt.tokens).")
        return spec.attach(model, tokens)

    # --- persistence ---------------------------------------------------------------------------
    def payload_checksum(self) -> str:
        """What ``config.json`` stores as ``checksum`` and :meth:`load` verifies: a hash of the vectors'
        exact bytes (:func:`~focuslens.core.io.tensor_checksum`) together with the heads in order, the hook
        site and the fingerprint, so that editing either file after saving is detected."""
        return _payload_checksum(self.heads, tensor_checksum(self.vectors), self.site, self.fingerprint)

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
            "checksum": self.payload_checksum(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the folder ``path`` (``directions.safetensors`` + ``config.json``) atomically.

        Files go to a temporary sibling folder which then replaces ``path`` in one atomic exchange
        (:func:`focuslens.core.io.atomic_dir`): a kill at any point leaves the previous or the new artefact
        loadable at ``path`` (leftovers are recovered or removed by the next load or save). The save
        holds the output lock of ``path``: a second process saving there at the same time gets
        :class:`~focuslens.core.errors.OutputBusy`. ``config.json`` carries :meth:`payload_checksum`.

        Only the artefact's own two files are replaced: any other file or folder in ``path`` (a
        ``NOTES.md``, plots) is kept. A save goes only into a new or empty folder or over an earlier
        artefact: a folder of other files, or one whose ``config.json`` is not a FocusDirections config
        (a model folder), is refused with :class:`~focuslens.core.errors.UsageError`, as is a
        symbolic link.
        """
        from safetensors.torch import save_file

        target = Path(path)
        if target.exists() and not target.is_dir():
            raise UsageError(f"{target} exists and is not a folder; FocusDirections are saved as a folder: "
                             "give another path.")
        _check_artefact_folder(target)
        vectors = self.vectors.detach().to("cpu").contiguous()
        with atomic_dir(target) as tmp:
            save_file({"vectors": vectors}, str(tmp / WEIGHTS_FILE), metadata={"format": "focuslens.FocusDirections"})
            atomic_write(tmp / CONFIG_FILE, json.dumps(self.config(), indent=2, default=str))
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
        """Read a folder written by :meth:`save`; with ``model=`` also refuse a mismatched model.

        Only ``config.json`` (JSON) and ``directions.safetensors`` are read; nothing is unpickled.
        Every defect of the folder — a missing or truncated file, a config that is not a
        FocusDirections object, a payload whose checksum differs from the one saved (bytes flipped,
        heads edited) — raises :class:`~focuslens.core.errors.UsageError` naming the file and the fix.
        Artefacts saved before checksums existed load with a warning. A folder left half-replaced by
        a killed save is recovered first (:func:`focuslens.core.io.recover_dir`).
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        p = recover_dir(Path(path))
        if not p.is_dir() or not (p / CONFIG_FILE).exists() or not (p / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"{p} is not a FocusDirections folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                                    "give the folder written by FocusDirections.save / focuslens train.")
        cfg_file = p / CONFIG_FILE
        fix = "re-save or re-train the directions"
        # both files exist; a FIFO, a link to /dev/zero, an unreadable or huge file is named as such
        check_regular_file(p / WEIGHTS_FILE, what=f"the {WEIGHTS_FILE} written by FocusDirections.save ({fix})",
                           max_bytes=WEIGHTS_MAX_BYTES)
        cfg = read_json(cfg_file, what=f"the {CONFIG_FILE} written by FocusDirections.save ({fix})")
        if not isinstance(cfg, dict) or cfg.get("format") != "focuslens.FocusDirections":
            raise UsageError(f"{cfg_file} is not a focuslens FocusDirections config (expected a JSON object with "
                             f"\"format\": \"focuslens.FocusDirections\", got {type(cfg).__name__}); {fix}.")
        version = cfg.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise UsageError(f"{cfg_file}: format_version must be an integer, got {version!r}; {fix}.")
        if version > FORMAT_VERSION:
            raise UsageError(f"{p} was written by a newer focuslens (format {version}); upgrade focuslens.")
        heads, fingerprint = cfg.get("heads"), cfg.get("fingerprint")
        if not isinstance(fingerprint, dict):
            raise UsageError(f"{cfg_file}: 'fingerprint' must be the model's architecture object, got "
                             f"{fingerprint!r}; {fix}.")
        if not isinstance(heads, list) or not all(
                isinstance(h, list) and len(h) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in h)
                for h in heads):
            raise UsageError(f"{cfg_file}: 'heads' must be a list of [layer, head] pairs of ints; {fix}.")
        for key, kind in (("site", str), ("objective", str), ("model_name", str), ("training", dict),
                          ("versions", dict), ("alpha", (int, float))):
            if key in cfg and (not isinstance(cfg[key], kind) or isinstance(cfg[key], bool)):
                raise UsageError(f"{cfg_file}: {key!r} has the wrong type ({type(cfg[key]).__name__}); {fix}.")
        try:
            tensors = load_file(str(p / WEIGHTS_FILE))
        except (SafetensorError, OSError, ValueError) as e:
            raise UsageError(f"{p / WEIGHTS_FILE}: cannot be read as safetensors ({e}): the file is truncated or "
                             f"corrupt; {fix}.") from None
        if set(tensors) != {"vectors"}:
            raise UsageError(f"{p / WEIGHTS_FILE} must hold exactly one tensor 'vectors', found {sorted(tensors)}; {fix}.")
        v = tensors["vectors"]
        site = cfg.get("site", "hook_rot_q")
        saved = cfg.get("checksum")
        if saved is None:
            warnings.warn(f"{p} has no payload checksum (saved by an older focuslens), so corruption cannot be "
                          "detected; re-save it (FocusDirections.load(p).save(p)) to add one.", UserWarning, stacklevel=2)
        else:
            actual = _payload_checksum([tuple(h) for h in heads], tensor_checksum(v), site, fingerprint)
            if saved != actual:
                raise UsageError(
                    f"{p}: the payload checksum does not match (config.json says {saved}, the files give {actual}): "
                    f"{WEIGHTS_FILE} or the heads/site/fingerprint in {CONFIG_FILE} changed after saving; {fix}.")
        if device is not None or dtype is not None:
            v = v.to(device=device, dtype=dtype)
        try:
            d = cls(heads=[tuple(h) for h in heads], vectors=v, fingerprint=fingerprint,
                    model_name=cfg.get("model_name", ""), site=site, alpha=float(cfg.get("alpha", 1.0)),
                    objective=cfg.get("objective", ""), training=cfg.get("training", {}),
                    versions=cfg.get("versions", {}))
        except ValueError as e:
            raise UsageError(f"{p}: {e} ({fix}).") from None
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
        """Import the reference code's per-layer query directions (``[n_heads, d_head]`` per layer).

        The reference code saves ``head_q_directions_{l}.pth`` with ``torch.save``: a pickle, which
        focuslens never reads (unpickling can run code). Convert them once, in a session you trust, to
        ``head_q_directions_{l}.safetensors`` (one tensor each: read it with torch there, write it with
        ``safetensors.torch.save_file({"directions": tensor}, path)``); this reads those. Key files (``head_k_directions_{l}.safetensors``) are shape-checked and
        dropped: key-side vectors are inert (constant-in-j logit terms). ``heads`` restricts to a subset
        (default: every head of every layer found).
        """
        folder = Path(folder)
        info = model_info(model)
        vecs: dict[Head, Tensor] = {}
        layers = []
        n_key = 0
        for l in range(info.n_layers):
            f = folder / f"head_q_directions_{l}.safetensors"
            if not f.exists():
                _refuse_pickled(folder / f"head_q_directions_{l}.pth")
                continue
            t = _load_authors_tensor(f)
            if t.shape != (info.n_heads, info.d_head):
                raise ValueError(f"{f.name} has shape {tuple(t.shape)}; expected [n_heads, d_head] = "
                                 f"[{info.n_heads}, {info.d_head}] for this model.")
            layers.append(l)
            for h in range(info.n_heads):
                vecs[(l, h)] = t[h]
            fk = folder / f"head_k_directions_{l}.safetensors"
            if fk.exists():
                tk = _load_authors_tensor(fk)
                if tk.shape[-1] != info.d_head:
                    raise ValueError(f"{fk.name} has shape {tuple(tk.shape)}; expected last dim {info.d_head}.")
                n_key += 1
        if not vecs:
            raise FileNotFoundError(f"No head_q_directions_{{layer}}.safetensors files in {folder}.")
        hs = list(vecs) if heads is None else check_heads(model, heads)
        missing = [h for h in hs if h not in vecs]
        if missing:
            raise ValueError(f"No imported direction for heads {missing}; layers found: {layers}.")
        return cls(heads=hs, vectors=torch.stack([vecs[h] for h in hs]),
                   fingerprint=info.fingerprint(), model_name=info.name, site=query_site(model),
                   alpha=alpha, objective="authors",
                   training={"source": str(folder), "layers": layers, "key_files_ignored": n_key,
                             "note": "key-side vectors are inert and were not imported"})


def _refuse_pickled(f: Path) -> None:
    """A reference-code ``.pth`` (a pickle) where a ``.safetensors`` was expected: a :class:`UsageError` saying how
    to convert it; the file itself is never opened."""
    if f.exists() or f.is_symlink():
        raise UsageError(
            f"{f} is a torch.save pickle; focuslens will not load it, since unpickling can run code. Convert it once, "
            "in a session you trust: read the tensor with torch, then safetensors.torch.save_file({'directions': "
            f"tensor}}, {str(f.with_suffix('.safetensors'))!r}), and import the .safetensors files.")


def _load_authors_tensor(f: Path) -> Tensor:
    """One converted ``head_*_directions_{l}.safetensors``: exactly one tensor; anything else is a
    :class:`UsageError` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    what = "a head_q_directions_{layer}.safetensors file holding one [n_heads, d_head] tensor"
    check_regular_file(f, what=what, max_bytes=WEIGHTS_MAX_BYTES)
    try:
        tensors = load_file(str(f), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"{f}: cannot be read as a safetensors file ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}); give {what}.") from None
    if len(tensors) != 1:
        raise UsageError(f"{f} holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); give {what}.")
    return next(iter(tensors.values()))


def _check_artefact_folder(target: Path) -> None:
    """Refuse to save into a folder that holds something other than a FocusDirections artefact."""
    if not target.is_dir() or target.is_symlink() or not any(target.iterdir()):
        return  # new or empty (a link is refused by atomic_dir, naming it)
    cfg = target / CONFIG_FILE
    why = f"no {CONFIG_FILE}"
    if cfg.is_file() and not cfg.is_symlink():
        try:
            obj = read_json(cfg, what=f"a {CONFIG_FILE}", max_bytes=1 << 24)
            if isinstance(obj, dict) and obj.get("format") == "focuslens.FocusDirections":
                return
            why = f"its {CONFIG_FILE} is not a FocusDirections config"
        except (OSError, ValueError):  # invalid, too deeply nested or too large JSON, a FIFO...
            why = f"its {CONFIG_FILE} cannot be read as JSON"
    raise UsageError(f"{target} is a folder but not a FocusDirections folder ({why}); a save goes only into a new "
                     "or empty folder or over an earlier artefact, so that no file of yours is replaced: give "
                     "another path.")


def _payload_checksum(heads: Sequence[Sequence[int]], vectors_checksum: str, site: str,
                      fingerprint: Mapping[str, Any]) -> str:
    return content_hash({"heads": [[int(l), int(h)] for l, h in heads], "vectors": vectors_checksum,
                         "site": site, "fingerprint": dict(fingerprint)})


def random_like(directions: FocusDirections, *, seed: int = 0) -> FocusDirections:
    """Random directions on the same heads with the same per-head norms (the matched-norm control)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(directions.vectors.shape, generator=g, dtype=torch.float32).to(directions.vectors)
    r = r / r.norm(dim=-1, keepdim=True) * directions.norms()[:, None]
    return directions._replace(vectors=r, objective="random", training={"control_of": directions.objective,
                                                                         "seed": seed})


class Steer(InterventionSpec):
    """Focus directions applied with a factor α (:meth:`FocusDirections.apply <focuslens.directions.FocusDirections.apply>`).

    Args:
        directions: a :class:`~focuslens.directions.FocusDirections`; the selected heads are copied
            at construction (``Steer(d, k=5)`` and ``Steer(d.top(5))`` are the same spec).
        alpha: a number, or ``"auto"`` (the sink-target magnitude control: needs each example's
            prompt tokens at attach time, so it is attached per example). Default: ``directions.alpha``.
        heads: a subset of the directions' heads (list of ``(layer, head)``).
        k: the top-k heads (``directions.top(k)``); not together with ``heads``.
        target, alpha_max, per: settings of ``alpha="auto"`` (part of the identity only then).
    """

    kind = "steer"
    __slots__ = ("directions", "alpha", "target", "alpha_max", "per")

    def __init__(
        self,
        directions: Any,
        *,
        alpha: float | Literal["auto"] | None = None,
        heads: Iterable[Sequence[int]] | None = None,
        k: int | None = None,
        target: float = 0.5,
        alpha_max: float = 4.0,
        per: Literal["head", "input"] = "head",
    ):
        what = "Steer"
        if not isinstance(directions, FocusDirections):
            raise TypeError(f"{what} takes a FocusDirections, got {type(directions).__name__}.")
        if heads is not None and k is not None:
            raise ValueError(f"{what}: give heads= or k=, not both.")
        d = directions
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(d):
                raise ValueError(f"{what}: k must be an int in 1..{len(d)}, got {k!r}.")
            d = d.top(k)
        elif heads is not None:
            d = d.select(heads)
        # Snapshot: the spec must keep describing what it applies even if the artefact is edited later.
        self.directions = d._replace(vectors=d.vectors.detach().clone(), training=copy.deepcopy(d.training))
        a = directions.alpha if alpha is None else alpha
        if isinstance(a, str):
            if a != "auto":
                raise ValueError(f"{what}: alpha must be a number or 'auto', got {a!r}.")
            self.alpha = "auto"
        else:
            self.alpha = real(a, name="alpha", what=what)
            # α·u overflowing the vectors' dtype (1e39 in float32) is refused here, for both engines alike; the
            # model's dtype is checked when attached (InjectVectors on the bridge, FusedModel.inject_vectors)
            check_scaled(self.directions.as_dict(), self.alpha, dtype=self.directions.vectors.dtype, what=what)
        self.target = real(target, name="target", what=what)
        if self.alpha == "auto" and not 0.0 < self.target < 1.0:
            raise ValueError(f"{what}: target is a fraction of sink mass in (0, 1); got {target!r}.")
        try:
            self.alpha_max = real(alpha_max, name="alpha_max", what=what)
        except ValueError:  # a bool, NaN or inf: the message below says what alpha_max is for
            self.alpha_max = float("nan")
        if not (self.alpha_max > 0 and math.isfinite(self.alpha_max)):
            raise ValueError(
                f"{what}: alpha_max is the top of the alpha grid [0, alpha_max] that alpha='auto' searches; "
                f"it must be finite and > 0, got {alpha_max!r}."
            )
        if per not in ("head", "input"):
            raise ValueError(f"{what}: per must be 'head' or 'input', got {per!r}.")
        self.per = per
        self._freeze()

    @property
    def heads(self) -> tuple[Head, ...]:
        return tuple(self.directions.heads)

    @property
    def per_example(self) -> bool:
        return self.alpha == "auto"

    @property
    def measures(self) -> bool:
        return self.alpha == "auto"  # the sink probe of each prompt

    def _ctor(self):
        return (self.directions,), {"alpha": self.alpha, "target": self.target, "alpha_max": self.alpha_max,
                                    "per": self.per}

    def _identity(self) -> dict[str, Any]:
        d = self.directions
        out: dict[str, Any] = {"heads": [list(h) for h in d.heads], "vectors": tensor_checksum(d.vectors),
                               "alpha": self.alpha, "site": d.site, "fingerprint": dict(d.fingerprint)}
        if self.alpha == "auto":
            out.update(target=self.target, alpha_max=self.alpha_max, per=self.per)
        return out

    def attach(self, model: HookedModel, example: Any = None) -> HookHandle:
        if self.alpha == "auto":
            tokens = tokens_of(example) if example is not None else None
            if tokens is None:
                raise ValueError("Steer(alpha='auto') needs the prompt: attach(model, example) with a "
                                 "RenderedExample (or its tokens).")
            return self.attach_rows(model, self.measure(model, [tokens]))
        d = self.directions
        d.check_applies_to(model)
        return self.attach_rows(model, {h: float(self.alpha) * u for h, u in d.as_dict().items()})

    def attach_batch(self, model: HookedModel, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        """Fixed α: attached once. ``alpha="auto"``: each row's α from its own unpadded prompt.

        The probe pass of :func:`~focuslens.directions.magnitude.sink_target_alphas` runs per example
        on the unpadded tokens (exactly what :meth:`attach` runs), then one injection hook adds row i's
        scaled vectors to row i (:func:`~focuslens.intervene.eager.inject_vectors` with ``[batch, d_head]``
        vectors). Pad positions only change pad rows, whose keys every real row masks.
        """
        check_batch(examples, offsets, what="Steer")
        if self.alpha != "auto":
            return self.attach(model, None)
        return self.attach_measured(model, self.measure(model, examples), examples, offsets=offsets)

    def measure(self, model: HookedModel, examples: Sequence[Any], prior: "InterventionSpec | None" = None):
        """``{head: [batch, d_head]}``: each row's auto-scaled vectors; the probe runs with ``prior``
        attached for that row alone (what a :class:`Compose` member attached before this one does)."""
        from .magnitude import sink_target_alphas

        d = self.directions
        d.check_applies_to(model)  # the checks of FocusDirections.apply
        rows = []
        for e in examples:
            tokens = tokens_of(e)
            if tokens is None:
                raise ValueError("Steer(alpha='auto').attach_batch needs each example's prompt tokens.")
            handle = prior.attach(model, e) if prior is not None else None
            try:
                a = sink_target_alphas(model, d, tokens, target=self.target, alpha_max=self.alpha_max, per=self.per)
            finally:
                if handle is not None:
                    handle.remove()
            rows.append(d.scaled(a).as_dict())
        return {h: torch.stack([r[h] for r in rows]) for h in rows[0]}

    @staticmethod
    def attach_rows(model: HookedModel, vectors) -> HookHandle:
        from ..intervene.eager import inject_vectors

        return inject_vectors(model, vectors, alpha=1.0, site="query", pre_rope=False)

    def attach_measured(self, model: HookedModel, measured: Any, examples: Sequence[Any], *,
                        offsets: Sequence[int]) -> HookHandle:
        """Row i's vectors (``measured``, from :meth:`measure`) added to row i's post-RoPE queries."""
        check_batch(examples, offsets, what="Steer")
        return self.attach_rows(model, measured)

    def attach_measured_fused(self, engine: Any, measured: Any, examples: Sequence[Any], *,
                              offsets: Sequence[int]) -> HookHandle:
        """:meth:`attach_measured` on the fused engine (:meth:`FusedModel.inject_vectors
        <focuslens.engine.FusedModel.inject_vectors>` with ``[batch, d_head]`` vectors)."""
        check_batch(examples, offsets, what="Steer")
        return engine.inject_vectors(measured, alpha=1.0)

    def attach_fused(self, engine: Any, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        """``α · u`` on the heads' post-RoPE queries on the fused engine (what :meth:`attach` adds on the bridge).

        ``alpha="auto"``: the sink probe (:meth:`measure`, a partial pass of each unpadded prompt) runs on
        the bridge the engine was built for (``engine.hooked``), giving the very α of :meth:`attach_batch`;
        each row's scaled vectors are then injected on the engine."""
        check_batch(examples, offsets, what="Steer")
        if self.alpha == "auto":
            measured = self.measure(measuring_model(engine, "Steer(alpha='auto')"), examples)
            return self.attach_measured_fused(engine, measured, examples, offsets=offsets)
        d = self.directions
        if engine.hooked is not None:
            d.check_applies_to(engine.hooked)
        return engine.inject_vectors({h: float(self.alpha) * u for h, u in d.as_dict().items()}, alpha=1.0)

    def scaled(self, c: float) -> "Steer":
        if self.alpha == "auto":
            raise TypeError("Steer(alpha='auto') picks α per prompt; change target= instead of scaling it.")
        c = real(c, name="scale", what="Steer.scaled")  # scaled(True) is not scaled(1)
        return Steer(self.directions, alpha=self.alpha * c, target=self.target, alpha_max=self.alpha_max,
                     per=self.per)

    def __repr__(self) -> str:
        a = "auto" if self.alpha == "auto" else f"{self.alpha:g}"
        extra = f", target={self.target:g}" if self.alpha == "auto" else ""
        return (f"Steer({format_heads(self.heads)}, α={a}{extra}, {self.directions.objective}, "
                f"vectors={self.identity['vectors'][:8]})")
