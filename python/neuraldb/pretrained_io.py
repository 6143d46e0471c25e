"""The edits-directory format of :mod:`neuraldb.pretrained`, the base-weights fingerprint, and the ``save_pretrained``
that :func:`neuraldb.patch_model` puts on a patched model.

A separate module from :mod:`neuraldb.pretrained` because of the import graph: ``NeuralKVDatabase.save_pretrained``
and the patched model's ``save_pretrained`` (installed by :mod:`neuraldb.patching`) call into this module, while
``neuraldb.from_pretrained`` calls ``patch_model``; this module imports neither :mod:`neuraldb.database` nor
:mod:`neuraldb.patching`, so neither import closes a cycle. Over 400 lines because of the same constraint: the
identity check (:func:`check_model`) that ``patch_model`` and ``edit`` make must live below both.

A directory holds, beside whatever else is there (a model's own ``config.json`` and weights, when it was written by a
patched model's ``save_pretrained``)::

    neuraldb_database.safetensors   the database, as written by NeuralKVDatabase.save (atomic, checksummed)
    neuraldb_config.json            {"format": "neuraldb.edits", "format_version": 1, "base_model": ...,
                                     "base_model_revision": ..., "base_model_quantization": ..., "architecture": ...,
                                     "model_class": ..., "fingerprint": ..., "fingerprint_method": ...,
                                     "fingerprint_dtype": ..., "module_path": ..., "layer": ..., "gamma": ...,
                                     "template": ..., "key_dim": ..., "value_dim": ..., "dtype": ..., "num_facts": ...}

The config is written after the database, each atomically; the loader checks the two agree (dims, number of facts).

**The fingerprint** (:func:`fingerprint`) is the model's identity, not its folder name or where it came from: the
SHA-256 (first 32 hex digits) of every floating-point parameter of ``model.parameters()`` (registration order; tied
weights once), each sampled at up to 4,096 evenly strided elements of its flattened tensor, **rounded to bfloat16**,
together with its shape. Why it survives:

- fp32 <-> bf16: rounding to bf16 (round to nearest even, the same on CPU and CUDA) is idempotent, so fp32 weights and
  the bf16 copy of them (``model.to(torch.bfloat16)``) give the same bf16 values, hence the same digest; bf16 weights
  loaded as fp32 are exact, so the same too.
- ``save_pretrained``/``from_pretrained``: safetensors stores the tensors bit for bit, and the reloaded model has the
  same parameters in the same order.
- It is not a statistic rounded to a few digits: any value near a rounding boundary would flip such a statistic under
  a dtype change, while bf16 rounding of the weights themselves is exact. Sampling keeps it cheap (all tensors, at
  most 4,096 values each: milliseconds for SmolLM2) while a fine-tune, a merged LoRA or a MEMIT-style edit changes
  the sampled values of the matrices it touches.

What it does not survive: an fp16 copy of fp32 weights (fp16 rounds to 10 mantissa bits first; re-rounding that to
bf16 differs from rounding the fp32 value in about one element in sixteen), and requantisation (a Q4_1 GGUF
dequantised is other weights than the checkpoint it was made from). :func:`neuraldb.from_pretrained` says so and
takes ``force=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from neuraldb.atomic import atomic_path
from neuraldb.models import _ALIASES, KNOWN_MODELS, model_id

CONFIG_NAME = "neuraldb_config.json"
DATABASE_NAME = "neuraldb_database.safetensors"
FORMAT = "neuraldb.edits"
FORMAT_VERSION = 1
FINGERPRINT_METHOD = "sha256/bf16/strided-4096/v1"
_SAMPLE = 4096
_IDENTITY = ("architecture", "fingerprint", "fingerprint_method", "fingerprint_dtype")

# "owner/name:Q4_1", "google/gemma-3-270m:Q4_K_M": a Hub id and the GGUF quantisation its weights went through
_QUANTISED = re.compile(r"^(?P<id>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?):(?P<quant>[A-Za-z0-9_]+)$")
# a snapshot in the Hugging Face cache: .../models--owner--name/snapshots/<commit>
_HF_CACHE = re.compile(r"models--(?P<id>[^/\\]+?)[/\\]snapshots[/\\](?P<rev>[0-9a-f]{40})")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?$")


def fingerprint(model: torch.nn.Module) -> str:
    """The fingerprint of ``model``'s weights: 32 hex digits, equal for the same weights in fp32 and bf16 and after
    ``save_pretrained``/``from_pretrained`` (see the module docstring for what it hashes and why).

    Raises ValueError for a model with no floating-point parameters, or with some on the meta device.
    """
    h = hashlib.sha256(FINGERPRINT_METHOD.encode())
    count = 0
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_floating_point():
                continue
            if p.device.type == "meta":
                raise ValueError("cannot fingerprint a model whose weights are on the meta device (offloaded?)")
            flat = p.detach().reshape(-1)
            if flat.numel() > _SAMPLE:
                flat = flat[:: flat.numel() // _SAMPLE][:_SAMPLE]
            sample = flat.to(torch.bfloat16).cpu().contiguous().view(torch.int16)
            h.update(repr(tuple(p.shape)).encode())
            h.update(sample.numpy().astype("<i2").tobytes())
            count += 1
    if not count:
        raise ValueError(f"{type(model).__name__} has no floating-point parameters to fingerprint")
    return h.hexdigest()[:32]


def weights_dtype(model: torch.nn.Module) -> str | None:
    """The dtype of the model's first floating-point parameter, as "float32"/"bfloat16"/..., or None."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return None if p is None else str(p.dtype).removeprefix("torch.")


def architecture(model: torch.nn.Module) -> str | None:
    """``model.config.model_type`` ("llama", "gemma3", ...), or None for a module without a Hugging Face config."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    return str(kind) if kind else None


def model_identity(model: torch.nn.Module) -> dict[str, str | None] | None:
    """What identifies ``model``'s weights, as a database records it (``db.model_identity``) and
    ``neuraldb_config.json`` holds it: ``{"architecture", "fingerprint", "fingerprint_method",
    "fingerprint_dtype"}``; None for a model that cannot be fingerprinted (weights on the meta device, none at all).

    Example::

        >>> neuraldb.pretrained.model_identity(model)["architecture"]   # doctest: +SKIP
        'llama'
    """
    try:
        digest = fingerprint(model)
    except ValueError:
        return None
    return {
        "architecture": architecture(model),
        "fingerprint": digest,
        "fingerprint_method": FINGERPRINT_METHOD,
        "fingerprint_dtype": weights_dtype(model),
    }


class ModelMismatchError(ValueError):
    """A database (or an edits directory) made for other weights or another architecture than the model given.

    ``detail`` is the message without the closing advice, for callers that word the override their own way (the
    CLI's ``--force``).
    """

    def __init__(self, detail: str, override: str) -> None:
        super().__init__(f"{detail}. Pass {override} to use them anyway")
        self.detail = detail


def _describe(name: str | None, arch: str | None, digest: str | None, dtype: str | None) -> str:
    return f"{name or '(no Hub id recorded)'} ({arch or 'architecture unknown'}, fingerprint {digest}, {dtype})"


def recorded_identity(db: Any) -> dict[str, Any]:
    """``db.model_identity`` with the base model's Hub id and quantisation (from ``db.model_id``), the record
    :func:`check_model` compares a model against."""
    hub_id, _, quant = base_model_id(getattr(db, "model_id", None))
    return {**(getattr(db, "model_identity", None) or {}), "base_model": hub_id, "base_model_quantization": quant}


def check_model(
    model: torch.nn.Module,
    recorded: dict[str, Any],
    *,
    force: bool = False,
    source: str = "the edits",
    override: str = "force=True",
    warn_unverifiable: bool = True,
    stacklevel: int = 3,
) -> None:
    """Check that ``model`` has the architecture and weights ``recorded`` (a ``neuraldb_config.json``, or
    :func:`recorded_identity` of a database) names. Model identity is the fingerprint and the architecture, never a
    folder name or a quantisation suffix.

    Raises :class:`ModelMismatchError` (a ValueError) naming both sides; with ``force=True`` warns instead. A record
    without a fingerprint (a database file written before neuraldb recorded one, edits saved without ``model=``)
    falls back to what it has: the architecture if recorded, and the base model's Hub id where both sides have one
    (a Q4_1 GGUF and its checkpoint share it); ``warn_unverifiable`` also warns that the weights go unchecked.
    ``patch_model`` checks the dimensions in every case. ``stacklevel`` is the warnings' (3: the caller's caller).

    Example::

        >>> check_model(model, recorded_identity(db))   # doctest: +SKIP
    """
    arch, want = architecture(model), recorded.get("architecture")
    digest, want_digest = None, recorded.get("fingerprint")
    name = base_model_id(model_id(model) if hasattr(model, "config") else None)[0]
    want_name = recorded.get("base_model")
    problems = []
    if want and arch and want != arch:
        problems.append(f"architecture {want!r} != {arch!r}")
    if want_digest is None:
        if name and want_name and name != want_name:
            problems.append(f"base model {want_name!r} != {name!r} (no fingerprint recorded: the names decide)")
        elif warn_unverifiable:
            warnings.warn(
                f"{source} record no fingerprint of their base weights (saved without model=, or by an older "
                f"neuraldb): cannot check that {type(model).__name__} is the model they were made for",
                UserWarning,
                stacklevel=stacklevel,
            )
    elif recorded.get("fingerprint_method") != FINGERPRINT_METHOD:
        warnings.warn(
            f"{source} record a fingerprint made by {recorded.get('fingerprint_method')!r}, which this neuraldb does "
            f"not compute ({FINGERPRINT_METHOD!r}): the weights are not checked",
            UserWarning,
            stacklevel=stacklevel,
        )
    else:
        try:
            digest = fingerprint(model)
        except ValueError as exc:
            warnings.warn(f"the weights are not checked against {source}: {exc}", UserWarning, stacklevel=stacklevel)
        else:
            if digest != want_digest:
                problems.append("other weights (the fingerprints differ)")
    if not problems:
        return
    dtype, want_dtype = weights_dtype(model), recorded.get("fingerprint_dtype")
    theirs = _describe(want_name, want, want_digest, want_dtype)
    msg = f"{source} were made for {theirs}, but this model is {_describe(name, arch, digest, dtype)}: "
    msg += "; ".join(problems)
    if "float16" in (dtype, want_dtype) and dtype != want_dtype:
        msg += " (an fp16 copy of fp32/bf16 weights, or the reverse, has another fingerprint: fp16 rounds differently)"
    quant = recorded.get("base_model_quantization")
    if quant and name == want_name and want_digest is not None and digest is not None:
        msg += f" (they were made on the {quant} quantisation, whose dequantised weights are not the checkpoint's)"
    if not force:
        raise ModelMismatchError(msg, override)
    warnings.warn(f"{msg}. Using them anyway ({override})", UserWarning, stacklevel=stacklevel)


def base_model_id(name: str | os.PathLike | None) -> tuple[str | None, str | None, str | None]:
    """``(hub_id, revision, quantization)`` for a recorded model identity (``db.model_id``, ``name_or_path``).

    A Hub id is kept; a GGUF suffix is split off (``"HuggingFaceTB/SmolLM2-135M-Instruct:Q4_1"`` ->
    ``("HuggingFaceTB/SmolLM2-135M-Instruct", None, "Q4_1")``); a neuraldb name (``"smollm2"``) becomes its Hub id; a
    Hugging Face cache snapshot path gives its id and commit; a local directory written by ``save_pretrained`` gives
    the base model its ``neuraldb_config.json`` names. Any other local path (or ``"gguf:FILE"``) gives None: a path
    means nothing on another machine, and the fingerprint, not the name, decides which weights edits belong to.
    """
    if name is None or not str(name):
        return None, None, None
    text = os.fspath(name)
    if text.startswith("gguf:"):  # load_model's identity for a .gguf file given by path
        return None, None, None
    cached = _HF_CACHE.search(text)
    if cached:
        return cached["id"].replace("--", "/", 1), cached["rev"], None
    known = KNOWN_MODELS.get(_ALIASES.get(text.lower(), text.lower()))
    if known is not None:
        text = known.model_id
    path = Path(text).expanduser()
    looks_local = path.is_absolute() or text.startswith((".", "~")) or (_HUB_ID.match(text) and path.exists())
    if looks_local:
        try:
            recorded = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
            return (
                recorded.get("base_model"),
                recorded.get("base_model_revision"),
                recorded.get("base_model_quantization"),
            )
        except (OSError, ValueError, AttributeError):
            return None, None, None
    quantised = _QUANTISED.match(text)
    if quantised:
        return quantised["id"], None, quantised["quant"]
    return (text, None, None) if _HUB_ID.match(text) else (None, None, None)


def build_config(db: Any, model: torch.nn.Module | None) -> dict[str, Any]:
    """The ``neuraldb_config.json`` of ``db`` (and of ``model``'s weights, when given)."""
    from neuraldb import __version__

    recorded = db.model_id or (model_id(model) if model is not None and hasattr(model, "config") else None)
    hub_id, revision, quant = base_model_id(recorded)
    if hub_id is not None and revision is None and model is not None and model_id(model) == recorded:
        revision = getattr(model.config, "_commit_hash", None)  # set when loaded from the Hugging Face cache
    identity = model_identity(model) if model is not None else getattr(db, "model_identity", None)
    identity = identity or {}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "neuraldb_version": __version__,
        "database_file": DATABASE_NAME,
        "base_model": hub_id,
        "base_model_revision": revision,
        "base_model_quantization": quant,
        "architecture": identity.get("architecture"),
        "model_class": type(model).__name__ if model is not None else None,
        "fingerprint": identity.get("fingerprint"),
        "fingerprint_method": identity.get("fingerprint_method"),
        "fingerprint_dtype": identity.get("fingerprint_dtype"),
        "module_path": db.module_path,
        "layer": db.layer,
        "gamma": db.gamma,
        "template": db.template,
        "key_dim": db.key_dim,
        "value_dim": db.value_dim,
        "dtype": str(db.dtype).removeprefix("torch."),
        "num_facts": len(db),
    }


def save(db: Any, directory: str | os.PathLike, model: torch.nn.Module | None = None) -> None:
    """Write ``db`` and its config into ``directory`` (created if absent); see :func:`neuraldb.save_pretrained`."""
    if model is None and not (getattr(db, "model_identity", None) or {}).get("fingerprint"):
        warnings.warn(
            f"saving edits to {os.fspath(directory)!r} without model=: the directory records no fingerprint of the "
            "base weights, so neuraldb.from_pretrained cannot check that a model is the one they were made for",
            UserWarning,
            stacklevel=3,
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with db.lock:  # the file and the config describe the same rows
        config = build_config(db, model)
        db.save(directory / DATABASE_NAME)
    with atomic_path(directory / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``neuraldb_config.json`` of ``directory``, checked for its format and version."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        hint = f" (a single database file loads with NeuralKVDatabase.load: {path.parent / DATABASE_NAME})"
        raise FileNotFoundError(
            f"{os.fspath(directory)!r} holds no {CONFIG_NAME}: it was not written by neuraldb's save_pretrained"
            + (hint if (path.parent / DATABASE_NAME).is_file() else "")
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f'{path} is not a neuraldb edits config (no "format": {FORMAT!r})')
    version = config.get("format_version")
    if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this neuraldb reads 1 to {FORMAT_VERSION}: upgrade")
    return config


def load_database(cls: type, directory: str | os.PathLike, *, device: torch.device | str = "cpu") -> Any:
    """``cls.load`` of the database in ``directory``, checked against its config (dims, number of facts)."""
    config = read_config(directory)
    name = config.get("database_file", DATABASE_NAME)
    if not isinstance(name, str) or Path(name).name != name:
        raise ValueError(f"{Path(directory) / CONFIG_NAME}: database_file must be a file name, got {name!r}")
    db = cls.load(Path(directory) / name, device=device)
    found = {"key_dim": db.key_dim, "value_dim": db.value_dim, "num_facts": len(db)}
    differ = {k: (config.get(k), v) for k, v in found.items() if config.get(k) is not None and config.get(k) != v}
    if differ:
        listed = ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in differ.items())
        raise ValueError(
            f"{Path(directory) / CONFIG_NAME} and {name} disagree ({listed}); was a save interrupted, or a file copied "
            "from elsewhere?"
        )
    if db.model_identity is None and config.get("fingerprint"):  # a database file older than its config's record
        db.model_identity = {k: config.get(k) for k in _IDENTITY}
    return db


class SavesDatabase:
    """What a patched model's ``save_pretrained`` is while it is patched (an instance attribute that
    :func:`neuraldb.patch_model` sets and :func:`neuraldb.unpatch_model` removes; the class is never touched).

    It saves the weights as before, then the patch's database beside them (:func:`save`), and warns once, on one
    line, how to load both back. ``push_to_hub=True`` is refused before anything is written (the upload would leave
    the edits behind); so is a database that cannot be saved this way (a sharded one: ``db.save`` it yourself).

    It holds the model strongly: a Hugging Face model is already a reference cycle (freed by the garbage collector,
    not on ``del``), and a deep copy or a pickle of the model gets a wrapper bound to the copy.
    """

    def __init__(self, model: torch.nn.Module, own: Callable | None, patch_of: Callable) -> None:
        self.model = model
        self.own = own  # the instance's own save_pretrained before patching (None: the class's)
        self.patch_of = patch_of

    def __call__(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        save = self.own if self.own is not None else type(model).save_pretrained.__get__(model)
        patch = self.patch_of(model)
        if patch is None:
            return save(save_directory, *args, **kwargs)
        main = args[0] if args else kwargs.get("is_main_process", True)
        push = args[2] if len(args) > 2 else kwargs.get("push_to_hub", False)
        db = patch.db
        if push:
            raise ValueError(
                "save_pretrained(push_to_hub=True) on a model patched by neuraldb would upload the base weights "
                "without the edits; save locally (the edits are written beside the weights), then upload the folder"
            )
        if not callable(getattr(db, "save_pretrained", None)):
            raise TypeError(
                f"this model is patched with a {type(db).__name__}, which save_pretrained cannot write beside the "
                "weights: save the database with db.save(...), or neuraldb.unpatch_model(model) to save the base alone"
            )
        out = save(save_directory, *args, **kwargs)
        if main:
            directory = os.fspath(save_directory)
            db.save_pretrained(directory, model=model)
            warnings.warn(
                f"neuraldb: saved the base weights to {directory!r} and the {len(db)} edits beside them "
                f"({DATABASE_NAME}); AutoModelForCausalLM.from_pretrained alone loads the unedited model; load both: "
                f"neuraldb.from_pretrained(AutoModelForCausalLM.from_pretrained({directory!r}), {directory!r})",
                UserWarning,
                stacklevel=2,
            )
        return out


def wrap_save_pretrained(model: torch.nn.Module, patch_of: Callable) -> None:
    """Make ``model.save_pretrained`` a :class:`SavesDatabase` (models without a ``save_pretrained`` are left be)."""
    own = model.__dict__.get("save_pretrained")
    if isinstance(own, SavesDatabase):
        own = own.own
    if own is None and not callable(getattr(type(model), "save_pretrained", None)):
        return
    model.__dict__["save_pretrained"] = SavesDatabase(model, own, patch_of)


def unwrap_save_pretrained(model: torch.nn.Module) -> None:
    """Undo :func:`wrap_save_pretrained` exactly: the instance's own ``save_pretrained`` back, or none."""
    wrapper = model.__dict__.get("save_pretrained")
    if isinstance(wrapper, SavesDatabase):
        if wrapper.own is None:
            del model.__dict__["save_pretrained"]
        else:
            model.__dict__["save_pretrained"] = wrapper.own


__all__ = [
    "CONFIG_NAME",
    "DATABASE_NAME",
    "ModelMismatchError",
    "SavesDatabase",
    "base_model_id",
    "build_config",
    "check_model",
    "fingerprint",
    "load_database",
    "model_identity",
    "read_config",
    "recorded_identity",
    "save",
]
