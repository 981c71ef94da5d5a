"""Magnitude control (this project's own design): α per input from the sink mass, no labels."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.attention import attention_probs, require_qk_route
from ..core.forward import run_until
from ..core.models import HookedModel, model_info
from ..core.prompts import LabelledPrompt

__all__ = ["sink_target_alphas", "calibrate_sink_target"]

def _sink_curves(
    model: HookedModel,
    directions: Any,  # a FocusDirections (not imported: artefact imports this module)
    tokens: Int[Tensor, "pos"] | LabelledPrompt,
    alphas: Float[Tensor, "A"],
    rows: int = 1,
) -> Float[Tensor, "n A"]:
    """Sink mass of the last ``rows`` prompt rows of each selected head at each α, from one probe pass.

    ``s_h(α) = mean_t A_h(α)_{t,0}`` with ``A_h(α)`` the head's pattern when ``α·u_h`` is added to its
    post-RoPE query, i.e. :func:`~focuslens.core.attention.attention_probs` with the logit bias
    ``α·scale·u_h·k_j`` (the layer's own scale, sliding window and soft-cap), from the cached queries
    and keys (the pass stops after the last selected layer). Exact for one head in isolation; the
    heads' effects on later layers are not included (that is what makes it one pass). On a
    sliding-window layer whose window no longer reaches token 0 the sink mass is 0, as in the model.
    """
    toks = tokens.tokens if isinstance(tokens, LabelledPrompt) else torch.as_tensor(tokens)
    n = int(toks.shape[-1])
    rows = min(rows, n)
    info = model_info(model)
    heads = directions.heads
    plan = require_qk_route(model, [l for l, _ in heads], what="The sink probe (alpha='auto')",
                            hint="Use a fixed alpha on this model.")
    names = [s for la in plan.values() for s in (la.q_hook, la.k_hook)]
    store = {k: v[0] for k, v in run_until(model, toks.reshape(1, -1), names=names).items()}
    qpos = torch.arange(n - rows, n)
    out = torch.zeros(len(heads), alphas.numel())
    for i, (l, h) in enumerate(heads):
        la = plan[l]
        q = store[la.q_hook][n - rows:, h].float()  # [r, d]
        k = store[la.k_hook][:, info.kv_head(h)].float()  # [N, d]
        u = directions.vectors[i].float().to(q.device)
        bias = alphas.to(q)[:, None, None] * ((k @ u) * la.scale)[None, None, :]  # [A, 1, N]
        out[i] = attention_probs(q, k, la, qpos, bias=bias)[..., 0].mean(-1).cpu()  # [A, r, N] -> [A]
    return out


def sink_target_alphas(
    model: HookedModel,
    directions: Any,  # a FocusDirections (not imported: artefact imports this module)
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
    if not 0.0 < float(alpha_max) < float("inf"):
        raise ValueError(f"alpha_max is the top of the α grid [0, alpha_max]; it must be finite and > 0, got {alpha_max}.")
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
    directions: Any,  # a FocusDirections (not imported: artefact imports this module)
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
