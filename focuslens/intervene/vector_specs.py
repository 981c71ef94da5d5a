"""The query-vector spec :class:`InjectVectors` (focus directions have their own, :class:`focuslens.directions.artefact.Steer`).

Both add a vector to chosen heads' queries at every position; they share the frozen-vector snapshot
(so a spec keeps describing what it applies if the tensors are edited later), the α scaling of the
spec arithmetic, and the batched attach (one α per row for the magnitude control ``alpha="auto"``).
The hooks are built here (:func:`attach_injection`); the eager
:func:`~focuslens.intervene.eager.inject_vectors` is sugar over :class:`InjectVectors`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.hooks import HookHandle, attach_hooks
from ..core.io import tensor_checksum
from ..core.models import HookedModel, hook_name, model_info
from ..core.checks import Head, check_scaled, frozen_vectors, real
from .specs import InterventionSpec, format_heads

__all__ = ["InjectVectors", "InjectSite", "attach_injection", "refuse_non_finite_edit", "refuse_non_finite_output"]

InjectSite = Literal["query", "key"]


class InjectVectors(InterventionSpec):
    """Add ``alpha * u`` to the query (or key) of chosen heads (:func:`~focuslens.intervene.eager.inject_vectors`).

    Args:
        vectors: ``{(layer, head): Tensor[d_head]}``; copied (later edits of the caller's tensors do
            not change the spec). Key order is part of the identity. Or ``Tensor[batch, d_head]`` for
            every head: row i of the forward pass gets row i (a batch of another size raises).
        alpha: scale (real, finite, not a bool); ``0`` is an exact identity. ``alpha * u`` must also
            be finite in the model's dtype (checked when attached).
        site: ``"query"`` or ``"key"`` (keys are KV heads).
        pre_rope: add before the rotary embedding (a different method; see ``inject_vectors``).
    """

    kind = "inject_vectors"
    __slots__ = ("vectors", "alpha", "site", "pre_rope")

    def __init__(
        self,
        vectors: Mapping[tuple[int, int], Float[Tensor, "d_head"] | Float[Tensor, "batch d_head"]],
        *,
        alpha: float = 1.0,
        site: InjectSite = "query",
        pre_rope: bool = False,
    ):
        what = "InjectVectors"
        self.vectors = frozen_vectors(vectors, what=what, rows=True)
        self.alpha = real(alpha, name="alpha", what=what)
        if site not in ("query", "key"):
            raise ValueError(f"{what}: site must be 'query' or 'key', got {site!r}.")
        self.site = site
        self.pre_rope = bool(pre_rope)
        self._freeze()

    @property
    def heads(self) -> tuple[Head, ...]:
        return tuple(self.vectors)

    def _ctor(self):
        return (dict(self.vectors),), {"alpha": self.alpha, "site": self.site, "pre_rope": self.pre_rope}

    def _identity(self) -> dict[str, Any]:
        stack = torch.stack(list(self.vectors.values()))
        return {"heads": [list(h) for h in self.vectors], "vectors": tensor_checksum(stack),
                "alpha": self.alpha, "site": self.site, "pre_rope": self.pre_rope}

    def attach(self, model: HookedModel, example: Any = None) -> HookHandle:
        return attach_injection(model, self.vectors, alpha=self.alpha, site=self.site, pre_rope=self.pre_rope)

    @property
    def fused(self) -> bool:
        """Post-RoPE query injection runs on the fused engine (the query it is handed is post-RoPE)."""
        return self.site == "query" and not self.pre_rope

    def attach_fused(self, engine: Any, examples: Sequence[Any], *, offsets: Sequence[int]) -> HookHandle:
        """``alpha · u`` added to the heads' post-RoPE queries on the fused engine (the ``hook_rot_q`` edit)."""
        if not self.fused:
            raise TypeError(f"{self!r}: only post-RoPE query injection runs on the fused engine.")
        return engine.inject_vectors(dict(self.vectors), alpha=self.alpha)  # checks alpha * u (check_scaled)

    def scaled(self, c: float) -> "InjectVectors":
        c = real(c, name="scale", what="InjectVectors.scaled")  # scaled(True) is not scaled(1)
        return InjectVectors(self.vectors, alpha=self.alpha * c, site=self.site, pre_rope=self.pre_rope)

    def __repr__(self) -> str:
        extra = ", pre_rope" if self.pre_rope else ""
        return (f"InjectVectors({format_heads(self.heads)}, α={self.alpha:g}, {self.site}{extra}, "
                f"vectors={self.identity['vectors'][:8]})")


# --------------------------------------------------------------------------------------------------
# The hooks
# --------------------------------------------------------------------------------------------------


def inject_site(model: HookedModel, site: InjectSite, pre_rope: bool) -> str:
    """The hook point name of ``site`` (``hook_rot_q`` / ``hook_rot_k`` post-RoPE on rotary models)."""
    if site not in ("query", "key"):
        raise ValueError(f"site must be 'query' or 'key', got {site!r}.")
    letter = "q" if site == "query" else "k"
    if model_info(model).rotary and not pre_rope:
        return f"hook_rot_{letter}"
    return f"hook_{letter}"


def _check_for_model(model: HookedModel, vectors: Mapping[Head, Tensor], *, alpha: float, site: InjectSite) -> None:
    """Heads (query or KV) in range, ``[d_head]`` (or ``[batch, d_head]``) vectors, α·u finite in the model's dtype."""
    info = model_info(model)
    n_slots = info.n_heads if site == "query" else info.n_kv_heads
    what = "query head" if site == "query" else "KV head"
    for (layer, head), u in vectors.items():
        if not (0 <= layer < info.n_layers and 0 <= head < n_slots):
            extra = (
                f" (site='key' vectors are keyed by KV head; this model has {info.n_kv_heads} KV "
                f"heads shared by {info.n_heads} query heads)" if site == "key" else ""
            )
            raise ValueError(
                f"Unknown {what} (layer={layer}, head={head}): this model has layers "
                f"0..{info.n_layers - 1} and {what}s 0..{n_slots - 1}{extra}."
            )
        if u.shape[-1] != info.d_head:
            raise ValueError(
                f"Vector for ({layer}, {head}) has shape {tuple(u.shape)}; expected ({info.d_head},) "
                f"= [d_head] (or [batch, {info.d_head}], one per batch row)."
            )
    check_scaled(vectors, alpha, dtype=_model_dtype(model), what="inject_vectors")


def _model_dtype(model: HookedModel) -> torch.dtype:
    dtype = getattr(getattr(model, "cfg", None), "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def attach_injection(model: HookedModel, vectors: Mapping[Head, Tensor], *, alpha: float, site: InjectSite,
                     pre_rope: bool) -> HookHandle:
    """Attach the hooks of :class:`InjectVectors` (validated ``vectors``, a finite ``alpha``): per edited layer,
    the edit (``hook_rot_q``/``hook_q``...) and a finiteness check of the edited heads' outputs (``hook_z``);
    a pass whose edit or attention overflows raises :class:`~focuslens.core.errors.UsageError`."""
    hook_site = inject_site(model, site, pre_rope)
    _check_for_model(model, vectors, alpha=alpha, site=site)
    by_layer: dict[int, dict[int, Tensor]] = defaultdict(dict)
    for (layer, head), u in vectors.items():
        by_layer[layer][head] = u
    hooks = []
    for layer in sorted(by_layer):
        heads = sorted(by_layer[layer])
        idx = torch.tensor(heads, dtype=torch.long)
        stack = torch.stack([by_layer[layer][h] for h in heads], dim=-2)  # [n_sel, d] or [batch, n_sel, d]
        hooks.append((hook_name(layer, hook_site), _make_add_hook(idx, stack, alpha, layer=layer, heads=heads)))
        z = hook_name(layer, "hook_z")
        if z in getattr(model, "hook_dict", {}):  # the edit is finite but q·k can overflow: check the heads' output
            checked = heads if site == "query" else None  # a key edit reaches every query head of its group
            hooks.append((z, _make_output_check(layer, checked, alpha, float(stack.abs().max()))))
    first = next(iter(vectors.values()))
    per_row = f", batch of {first.shape[0]}" if first.dim() == 2 else ""
    label = f"inject_vectors({site}, alpha={alpha:g}, {len(vectors)} heads, {hook_site}{per_row})"
    handle = attach_hooks(model, hooks, label=label)
    handle.hook_names = [n for n, _ in hooks if not n.endswith("hook_z")]
    return handle


def refuse_non_finite_edit(before: Tensor, edited: Tensor, add: Tensor, *, layer: int, heads: Sequence[int],
                           alpha: float) -> None:
    """Raise the error of a non-finite injection: which heads, the largest activation and the largest added entry.

    ``before``/``edited``: the heads' queries (or keys) ``[batch, pos, n_sel, d_head]`` before and after the
    edit, ``add`` what was added. Shared by the bridge's hooks and the fused engine
    (:mod:`focuslens.engine.attention`), so that both routes refuse with the same message.
    """
    from ..core.errors import UsageError

    bad = [(layer, h) for j, h in enumerate(heads) if not bool(torch.isfinite(edited[:, :, j, :]).all())]
    finite_in = bool(torch.isfinite(before).all())
    big_x = float(before[torch.isfinite(before)].abs().max()) if before.numel() and finite_in else float("nan")
    big_add = float(add.abs().max())
    cause = ("the activations were already non-finite before the edit (the model or an earlier hook)"
             if not finite_in else
             f"adding alpha * vector (largest |entry| {big_add:g}) to activations up to {big_x:g} overflows "
             f"{str(edited.dtype).replace('torch.', '')}")
    raise UsageError(
        f"inject_vectors (alpha = {alpha:g}) made the query/key of heads {bad} non-finite on this forward pass: "
        f"{cause}; use a smaller alpha or rescale the vectors (the pass was stopped instead of returning "
        "NaN/inf logits).")


def _make_output_check(layer: int, heads: list[int] | None, alpha: float, big_u: float):
    """A hook on ``hook_z`` (the heads' outputs) that refuses a non-finite output of the edited heads: a
    finite query of 3e38 still overflows ``q·k`` in float32, and the pass would return NaN logits."""
    idx: dict[Any, Tensor] = {}

    def check(z: Float[Tensor, "batch pos head d_head"], hook=None):
        if alpha == 0.0:
            return z
        if heads is None:
            part = z
        else:
            if z.device not in idx:
                idx[z.device] = torch.tensor(heads, dtype=torch.long, device=z.device)
            part = z.index_select(2, idx[z.device])
        if not bool(torch.isfinite(part).all()):
            refuse_non_finite_output(z, layer=layer, heads=heads, alpha=alpha, big_u=big_u)
        return z

    return check


def refuse_non_finite_output(z: Float[Tensor, "batch pos head d_head"], *, layer: int, heads: Sequence[int] | None,
                             alpha: float, big_u: float) -> None:
    """Raise the error of an injection whose heads' attention output (``hook_z``) is not finite, naming the
    heads, α and the largest vector entry. Shared by the bridge's ``hook_z`` check and the fused engine
    (:mod:`focuslens.engine.attention`), so that both routes refuse with the same message."""
    from ..core.errors import UsageError

    names = [(layer, h) for h in (heads if heads is not None else range(z.shape[2]))
             if not bool(torch.isfinite(z[:, :, h]).all())]
    raise UsageError(
        f"inject_vectors (alpha = {alpha:g}, largest |vector entry| {big_u:g}) made the attention output "
        f"of heads {names} non-finite on this forward pass (the edited queries/keys overflow the "
        f"attention scores q·k in {str(z.dtype).replace('torch.', '')}); use a smaller alpha or rescale "
        "the vectors (the pass was stopped instead of returning NaN/inf logits).")


def _make_add_hook(idx: Tensor, stack: Tensor, alpha: float, *, layer: int, heads: list[int]):
    """The hook adding ``alpha * u`` to heads ``idx`` of one layer; it refuses to return a non-finite edit.

    Why the check: ``alpha * u`` is finite (checked when attached) but ``q + alpha * u`` can still overflow
    the model's dtype (3e38 + a query in float32, 6e4 in float16), and an inf query makes every logit of
    the pass NaN without an error. Only the edited heads' slice is checked (one reduction per hooked
    layer and pass; measured in docs/guarantees.md).
    """
    cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def hook(x: Float[Tensor, "batch pos head d_head"], hook=None):
        if alpha == 0.0:
            return x  # exact identity, no arithmetic at all
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = (idx.to(x.device), (alpha * stack.to(torch.float64)).to(x.device, x.dtype))
        i, add = cache[key]
        if add.dim() == 3:  # one vector per batch row: [batch, n_sel, d] -> [batch, 1, n_sel, d]
            if x.shape[0] != add.shape[0]:
                raise ValueError(
                    f"inject_vectors was given vectors for a batch of {add.shape[0]} rows but the forward "
                    f"pass has {x.shape[0]}: attach it with the prompts of this batch."
                )
            add = add[:, None]
        edited = x[:, :, i, :] + add  # broadcast over batch and positions
        if not bool(torch.isfinite(edited).all()):
            refuse_non_finite_edit(x[:, :, i, :], edited, add, layer=layer, heads=heads, alpha=alpha)
        out = x.clone()
        out[:, :, i, :] = edited
        return out

    return hook
