"""Focus directions: learned per-head query vectors that move attention onto the relevant context.

What this is (docs/method.md §4)
--------------------------------
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
  queries (response rows) and keys enter the loss, frozen forward passes (batched, each stopped after
  the last selected layer) cache them
  (:func:`cache_qk`) and the optimisation runs on those tensors: all heads jointly as one batched
  problem (``method="batched"``, full-batch Adam, seconds) or the authors' loop (``method="per_layer"``:
  per layer, batch 1, AdamW lr 1e-3, init N(0, 0.01²), 10 epochs), kept as a reference.
* ``objective="likelihood"`` (this project's documented alternative, docs/method.md §4): the selected
  heads' vectors are trained jointly *through the live frozen model* (hooks add α·u at the query site,
  gradients reach u only) on the log-likelihood of the response given the full prompt.
  ``objective="both"`` adds ``attention_weight ×`` the (live) attention objective.

Which to use: the attention objective is exact, cheap and what the paper describes, but raising the
average attention mass did not move accuracy on SmolLM2 in our measurements (docs/directions.md); the
likelihood objective did. Offer both, compare against random vectors of matched norm.

Applying and magnitude control
------------------------------
``with directions.apply(model, alpha=0.5):`` injects through
:func:`focuslens.intervene.eager.inject_vectors`. ``alpha="auto"`` is **this project's own magnitude
control** (the revised paper's algorithm is not public): from one probe pass over the prompt, choose
α per head so that the last prompt row's attention on the sink (first token) falls by a target
fraction (:func:`sink_target_alphas`). No labels are needed at inference.
"""

from __future__ import annotations

from ..core.attention import attention_scale, query_site
from .artefact import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, FocusDirections, Steer, random_like
from .data import DirectionExample, make_direction_examples
from .magnitude import calibrate_sink_target, sink_target_alphas
from .objectives import QKCache, attention_mass, cache_qk, heldout_attention
from .config import Method, Objective, TrainConfig
from .train import train_focus_directions

__all__ = [
    "FocusDirections",
    "Steer",
    "DirectionExample",
    "QKCache",
    "make_direction_examples",
    "cache_qk",
    "attention_mass",
    "attention_scale",
    "query_site",
    "train_focus_directions",
    "TrainConfig",
    "heldout_attention",
    "sink_target_alphas",
    "calibrate_sink_target",
    "random_like",
    "WEIGHTS_FILE",
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "Objective",
    "Method",
]
