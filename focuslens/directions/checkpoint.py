"""Training checkpoints keyed by the content that produced them; safetensors + JSON, never a pickle.

A checkpoint is reused only when its identity (model fingerprint and full weights digest, heads, resolved
:class:`~focuslens.directions.config.TrainConfig`, training and validation data, norm limits, layout
version) equals the run's; otherwise the run is refused with the differences named. A legacy
``state.pt`` is never loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.checks import read_json
from ..core.io import atomic_write, atomic_write_json, content_hash, tensor_checksum
from ..core.models import model_identity
from .config import TrainConfig
from .data import DirectionExample

__all__ = ["CHECKPOINT_FORMAT_VERSION", "CHECKPOINT_JSON", "LEGACY_CHECKPOINT"]

#: Version of the checkpoint layout (part of the training identity: a new layout never resumes an old one).
CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_JSON = "checkpoint.json"
LEGACY_CHECKPOINT = "state.pt"
_CHECKPOINT_FORMAT = "focuslens.train-checkpoint"


# --------------------------------------------------------------------------------------------------
# The training identity and the checkpoint


def _examples_digest(examples: Sequence[DirectionExample] | None) -> dict[str, Any]:
    """Count and content hash of what the objectives read from examples: tokens, relevant span, response span."""
    rows = []
    for e in examples or []:
        r = e.prompt.response
        rows.append([tensor_checksum(e.prompt.tokens), [e.relevant.start, e.relevant.end], [r.start, r.end]])
    return {"n": len(rows), "hash": content_hash(rows)}


def _identity(model, heads, cfg: TrainConfig, examples, val_examples, limit: Tensor | None) -> dict[str, Any]:
    """Everything that determines the trained vectors — what a checkpoint is keyed by.

    ``epochs`` is left out: the run with more epochs continues the same trajectory (a checkpoint after
    epoch 1 is the state after epoch 1 of a 2-epoch run), which is what resuming means.
    """
    conf = cfg.to_dict()
    conf.pop("epochs")
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model": model_identity(model),
        "heads": [[int(l), int(h)] for l, h in heads],
        "config": conf,
        "train_examples": _examples_digest(examples),
        "val_examples": _examples_digest(val_examples),
        "norm_limit": None if limit is None else tensor_checksum(limit.float()),
    }


def _short(x: Any, n: int = 80) -> str:
    s = repr(x) if isinstance(x, (str, int, float, bool, type(None))) else json.dumps(x, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def _differences(old: Any, new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two identities (old: read from the checkpoint)."""
    if not isinstance(old, dict):
        return ["the checkpoint does not record what produced it"]
    out = []
    if old.get("format_version") != new["format_version"]:
        out.append(f"checkpoint format {old.get('format_version')!r} there, {new['format_version']} now")
    om, nm = old.get("model") or {}, new["model"]
    if om.get("fingerprint") != nm["fingerprint"]:
        ofp = om.get("fingerprint") or {}
        keys = [k for k in nm["fingerprint"] if ofp.get(k) != nm["fingerprint"][k]] or ["fingerprint"]
        out.append("another model (" + ", ".join(f"{k}={ofp.get(k)!r} there, {nm['fingerprint'].get(k)!r} now"
                                                 for k in keys) + ")")
    elif om.get("weights_digest") != nm.get("weights_digest"):
        out.append(f"written by an older focuslens whose model identity did not hash every weight (weights digest "
                   f"{om.get('weights_digest', 'sampled')!r} there, {nm.get('weights_digest')!r} now)")
    elif om.get("weights") != nm["weights"]:
        out.append("other model weights (same architecture)")
    if old.get("heads") != new["heads"]:
        out.append(f"heads={_short(old.get('heads'))} there, {_short(new['heads'])} now")
    oc, nc = old.get("config") or {}, new["config"]
    for k in nc:
        if oc.get(k, "<missing>") != nc[k]:
            out.append(f"{k}={_short(oc.get(k, '<missing>'))} there, {_short(nc[k])} now")
    for key, what in (("train_examples", "training examples"), ("val_examples", "validation examples")):
        od, nd = old.get(key) or {}, new[key]
        if od != nd:
            if od.get("n") != nd["n"]:
                out.append(f"other {what} ({od.get('n')} there, {nd['n']} now)")
            else:
                out.append(f"other {what} (same count, {nd['n']}, but other tokens, spans or responses)")
    if old.get("norm_limit") != new["norm_limit"] and not out:
        out.append("another max_norm limit (the cached query norms differ)")
    return out or ["the identity hash differs"]


class _Checkpoint:
    """A live-objective checkpoint folder, keyed by the training identity. No pickle anywhere.

    Layout of the folder:

    * ``checkpoint-eNNNN.safetensors``: the tensors after epoch NNNN — ``u`` (current vectors),
      ``best_u`` (best on validation so far) and the Adam state (``adam.step``, ``adam.exp_avg``,
      ``adam.exp_avg_sq``).
    * ``checkpoint.json``: the commit point, written last: format, ``identity`` (content hash),
      ``identity_parts`` (what was hashed, to name differences), ``epoch``, ``best_val``, ``bad``,
      ``history``, the tensors file name and its tensors' checksums. Older tensors files are removed
      after it is written, so an interrupted write leaves the previous epoch's complete checkpoint.

    Only files this class wrote are ever removed: the tensors file named by the previous
    ``checkpoint.json`` and ``checkpoint-e*.safetensors`` files whose safetensors header says
    ``{"format": "focuslens.train-checkpoint"}``; any other file in the folder is left alone.

    Resume rule: a checkpoint is reused only when its identity equals this run's; otherwise
    :meth:`load` raises a ValueError naming each difference (nothing is overwritten). A legacy
    ``state.pt`` (pickle) is never loaded: a warning says it is ignored.
    """

    def __init__(self, folder: Path, parts: dict[str, Any]):
        self.folder, self.parts, self.key = folder, parts, content_hash(parts)

    def _broken(self, path: Path, why: str) -> ValueError:
        return ValueError(f"{path}: not a usable training checkpoint ({why}); it may have been truncated or "
                          f"edited. Delete {self.folder} to train afresh, or give another checkpoint_dir.")

    def load(self, shape: tuple[int, ...]) -> dict[str, Any] | None:
        legacy = self.folder / LEGACY_CHECKPOINT
        if legacy.exists():
            warnings.warn(f"{legacy}: a legacy pickle checkpoint from an older focuslens is never loaded "
                          f"(unpickling a file can run arbitrary code); it is ignored. Delete it to silence "
                          f"this warning.", UserWarning, stacklevel=3)
        path = self.folder / CHECKPOINT_JSON
        if not path.exists():
            return None
        # a FIFO, a link to /dev/zero, invalid or too deeply nested JSON: a UsageError naming the file
        meta = read_json(path, what=f"the {CHECKPOINT_JSON} a training run wrote (it may have been truncated or "
                                    f"edited: delete {self.folder} to train afresh, or give another checkpoint_dir)")
        if not isinstance(meta, dict) or meta.get("format") != _CHECKPOINT_FORMAT:
            raise self._broken(path, "not a focuslens training checkpoint")
        if meta.get("identity") != self.key:
            diffs = _differences(meta.get("identity_parts"), self.parts)
            raise ValueError(f"The checkpoint in {self.folder} was written by another training run, so it is not "
                             f"reused: {'; '.join(diffs)}. Give another checkpoint_dir for this run, or delete "
                             f"{self.folder} to train afresh.")
        try:
            epoch, bad, hist, fname = int(meta["epoch"]), int(meta["bad"]), list(meta["history"]), str(meta["tensors"])
            best_val = math.inf if meta["best_val"] is None else float(meta["best_val"])
            sums = dict(meta["checksums"])
            scalars = dict(meta.get("adam_scalars") or {})
        except (KeyError, TypeError, ValueError) as e:
            raise self._broken(path, f"missing or malformed field: {e}") from None
        if Path(fname).name != fname or not fname.endswith(".safetensors"):
            raise self._broken(path, f"bad tensors file name {fname!r}")
        tpath = self.folder / fname
        if not tpath.exists():
            raise self._broken(tpath, "the tensors file is missing")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(tpath))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # truncated or garbled file
            raise self._broken(tpath, f"unreadable safetensors file: {e}") from None
        for k in ("u", "best_u"):
            if k not in tensors or tuple(tensors[k].shape) != tuple(shape):
                raise self._broken(tpath, f"tensor {k!r} missing or not of shape {tuple(shape)}")
        if set(sums) != set(tensors) or any(tensor_checksum(tensors[k]) != sums[k] for k in tensors):
            raise self._broken(tpath, f"its tensors do not match the checksums in {CHECKPOINT_JSON}")
        adam = {k[len("adam."):]: v for k, v in tensors.items() if k.startswith("adam.")}
        adam.update(scalars)
        return {"epoch": epoch, "bad": bad, "history": hist, "best_val": best_val, "u": tensors["u"],
                "best_u": tensors["best_u"], "adam": adam}

    def save(self, *, u: Tensor, best_u: Tensor, opt: torch.optim.Optimizer, epoch: int, best_val: float,
             bad: int, hist: list[dict]) -> None:
        from safetensors.torch import save_file

        state = opt.state_dict()["state"]
        adam = state.get(0, {}) if len(state) else {}
        tensors = {"u": u.detach().cpu().contiguous().clone(), "best_u": best_u.detach().cpu().contiguous().clone()}
        tensors.update({f"adam.{k}": v.detach().cpu().contiguous().clone() for k, v in adam.items()
                        if isinstance(v, Tensor)})
        scalars = {k: v for k, v in adam.items() if not isinstance(v, Tensor)}
        fname = f"checkpoint-e{epoch:04d}.safetensors"
        previous = self._previous_tensors()
        atomic_write(self.folder / fname, lambda p: save_file(tensors, p, metadata={"format": _CHECKPOINT_FORMAT}))
        atomic_write_json(self.folder / CHECKPOINT_JSON, {
            "format": _CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
            "identity": self.key, "identity_parts": self.parts,
            "epoch": epoch, "best_val": best_val if math.isfinite(best_val) else None, "bad": bad,
            "history": hist, "tensors": fname, "checksums": {k: tensor_checksum(v) for k, v in tensors.items()},
            "adam_scalars": scalars,
        })
        for old in self.folder.glob("checkpoint-e*.safetensors"):
            if old.name != fname and (old.name == previous or _written_here(old)):
                old.unlink(missing_ok=True)

    def _previous_tensors(self) -> str | None:
        """The tensors file named by the checkpoint.json already in the folder (one this class wrote), if any."""
        try:
            meta = read_json(self.folder / CHECKPOINT_JSON, what=f"a {CHECKPOINT_JSON}")
        except (OSError, ValueError):  # none, or not ours: no tensors file of it to remove
            return None
        if isinstance(meta, dict) and meta.get("format") == _CHECKPOINT_FORMAT and isinstance(meta.get("tensors"), str):
            return meta["tensors"]
        return None


def _written_here(path: Path) -> bool:
    """Whether ``path`` is a checkpoint tensors file written by :meth:`_Checkpoint.save` (its header says so)."""
    from safetensors import SafetensorError, safe_open

    if path.is_symlink() or not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format") == _CHECKPOINT_FORMAT
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return False


# --------------------------------------------------------------------------------------------------
# The live objectives (likelihood, both)


@dataclass
class _LiveState:
    u: Tensor
    opt: torch.optim.Optimizer
    best_u: Tensor
    best_val: float = math.inf
    bad: int = 0
    epoch: int = 0
    hist: list = dataclasses.field(default_factory=list)

    def record_val(self, v: float) -> None:
        if v < self.best_val - 1e-6:
            self.best_val, self.best_u, self.bad = v, self.u.detach().clone(), 0
        else:
            self.bad += 1


def _restore(state: _LiveState, ck: _Checkpoint, epochs: int) -> int:
    """Load ``ck`` into ``state`` if it holds this run's checkpoint; return the epoch resumed from (0: none)."""
    saved = ck.load(tuple(state.u.shape))
    if saved is None:
        return 0
    if saved["epoch"] > epochs:
        raise ValueError(f"The checkpoint in {ck.folder} has {saved['epoch']} epochs, more than the {epochs} asked "
                         f"for; ask for epochs >= {saved['epoch']} to reuse it, or give another checkpoint_dir.")
    with torch.no_grad():
        state.u.copy_(saved["u"])
    sd = state.opt.state_dict()
    if saved["adam"]:
        adam = {k: (v.to(state.u.device) if isinstance(v, Tensor) and k != "step" else v)
                for k, v in saved["adam"].items()}
        sd["state"] = {0: adam}
    state.opt.load_state_dict(sd)
    state.best_u, state.best_val, state.bad = saved["best_u"].to(state.u.device), saved["best_val"], saved["bad"]
    state.epoch, state.hist = saved["epoch"], saved["history"]
    return saved["epoch"]
