"""Editing hyperparameters, and how a model's defaults are put together.

The numbers live in the family table, :data:`neuraldb.architectures.ARCHITECTURES`: every known family gives a layer
(a fraction of the depth) and a gamma; the sizes swept in docs/editing.md (``benchmarks/bench_editing.py --sweep``)
add their tuned values (:class:`neuraldb.architectures.Tuned`), matched by architecture and size, never by name. A
tuned ``compute_dtype="bfloat16"`` applies only where bf16 runs natively (:func:`native_bf16`); elsewhere the default
is float32, since emulated bf16 makes every step several times slower. Explicit arguments win over all of it
(:func:`resolve`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from types import MappingProxyType
from typing import Any

import torch

from neuraldb import architectures as arch


@dataclass(frozen=True)
class EditConfig:
    """Everything that decides the keys and residuals, recorded in ``db.config``.

    Attributes:
        layer: the layer whose MLP down-projection is edited (None: the model's default).
        gamma: the gate threshold stored in the database (None: the model's default).
        n_prefixes, prefix_len: how many model-generated context prefixes, of how many tokens (paper Eq. 18-19).
        seed: the seed of the prefix generation.
        steps, lr: Adam iterations and learning rate of the residual optimisation (Eq. 19).
        kl_factor: weight of KL(edited || unedited) on ``kl_prompt`` at the prompt's last token.
        weight_decay: weight of ``||r|| / ||h||^2`` (MEMIT's v_weight_decay).
        clamp_norm_factor: ``||r|| <= clamp_norm_factor * ||h||``, h the layer's output at the subject's last token.
        stop_loss: a fact stops (and leaves the batch) once its loss is below this (MEMIT: 5e-2).
        patience: if > 0, a fact also stops when its loss has not improved by 2% for this many steps (facts
            whose loss has a floor above stop_loss, e.g. held by the norm clamp, stop burning steps).
        extra_steps: steps a fact may take beyond ``steps`` while some target token is not yet the argmax at its
            position in some context (question-style targets of several tokens need them; a fact that succeeds
            within ``steps`` is optimised exactly as without them).
        warm_start: when appending to a database, start each fact's residual at the mean residual of the
            database's facts with the same prompt and target (else the same target) (:mod:`neuraldb.editing.warm`).
        warm_steps: the step budget of a fact that found such a start (``extra_steps`` still apply after it).
        kl_prompt: the "{} is a" prompt of the KL term.
        batch_size: facts optimised together.
        key_bare_weight: weight of the bare prompt in the key mean (the prefixed contexts share the rest); None
            is the plain mean of Eq. 18; MEMIT's grouping amounts to 0.5.
        key_unit_mean: average the contexts' keys after scaling each to unit length. The gate is a cosine, and the
            unit mean is the direction of best (weighted) mean cosine to the contexts; the plain mean weights a
            context by its key's norm, and a subject right after the start token can have a key 10x shorter
            than in the prefixed contexts, so the bare rewrite prompt itself would barely shape the key.
        compute_dtype: "bfloat16" runs the layers above the edited one (in the no-grad pass, for the cache and the
            KL reference) and the optimisation steps with bf16 weights; the keys, the clamp norms, r and the Adam
            state stay float32. About 2.5x faster on CPUs with AMX (docs/editing.md); slow where bf16 is emulated,
            so a model's default asks for it only where :func:`native_bf16` holds.
    """

    layer: int | None = None
    gamma: float | None = None
    n_prefixes: int = 5
    prefix_len: int = 10
    seed: int = 0
    steps: int = 20
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    stop_loss: float = 5e-2
    patience: int = 0
    extra_steps: int = 0
    warm_start: bool = False
    warm_steps: int = 3
    kl_prompt: str = "{} is a"
    batch_size: int = 32
    compute_dtype: str = "float32"
    key_bare_weight: float | None = None
    key_unit_mean: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


# What docs/editing.md calls the per-model table: a read-only view of the tuned entries of the family table, by the
# name of the model each was swept on. Matching goes by architecture and size (defaults_for), not by these names.
MODEL_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {t.name: t.edit for spec in arch.ARCHITECTURES.values() for t in spec.tuned}
)


# oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) below AVX512_CORE_BF16: under one, torch's bf16 products are emulated even
# on a CPU that has the instructions.
_ONEDNN_CAPS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


# Fields added to EditConfig after databases were first written, with the value that reproduces how a database
# whose recorded config lacks them was edited: appending to it or resuming its job goes on the same way.
ADDED_FIELDS: Mapping[str, Any] = MappingProxyType({"extra_steps": 0, "warm_start": False, "warm_steps": 3})


def recorded(config: Mapping[str, Any] | None, fields: set[str]) -> dict[str, Any]:
    """The values of ``fields`` that a database's recorded ``config`` fixes: its own, and for a field added since it
    was written (:data:`ADDED_FIELDS`), the value it was edited with. An empty config fixes nothing."""
    if not config:
        return {}
    own = {k: v for k, v in config.items() if k in fields}
    return {**{k: v for k, v in ADDED_FIELDS.items() if k in fields}, **own}


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matrix products run natively on ``device``: a CUDA GPU of compute capability 8.0 or more, or an x86
    CPU with AMX or AVX512-BF16 (unless ``ONEDNN_MAX_CPU_ISA`` caps oneDNN below them). Anywhere else torch emulates
    them: on this project's AMX CPU, capped to AVX2 or plain AVX-512, a bf16 linear layer of SmolLM2's size took 9x /
    4.5x its fp32 time, against 0.33x uncapped (docs/editing.md). Other CPUs (e.g. ARM) count as emulating.

    Example::

        >>> native_bf16("meta")
        False
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu" or os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in _ONEDNN_CAPS_WITHOUT_BF16:
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, hence looked up with a fallback
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _bf16_pays(model) -> bool:
    # A model already in bf16 has nothing to convert; one in float32 converts only where bf16 is native.
    params = model.parameters() if isinstance(model, torch.nn.Module) else ()
    param = next((p for p in params if p.is_floating_point()), None)
    return param is not None and (param.dtype == torch.bfloat16 or native_bf16(param.device))


def defaults_for(model: torch.nn.Module) -> EditConfig:
    """The EditConfig for ``model``, decided by what it is (its ``model_type`` and config sizes), not by its name or
    folder: the family's layer and gamma, then the tuned values of its size where it was swept (with
    ``compute_dtype`` float32 where bf16 would be emulated, see :func:`native_bf16`); the generic values, and no
    layer, for a family not in the table.

    Example::

        >>> model, tok = neuraldb.load_model("smollm2")   # doctest: +SKIP
        >>> cfg = defaults_for(model)                     # doctest: +SKIP
        >>> cfg.layer, cfg.lr, cfg.steps                  # doctest: +SKIP
        (6, 2.0, 10)
    """
    try:
        family = {"layer": arch.default_layer(model), "gamma": arch.default_gamma(model)}
    except (ValueError, TypeError):
        return EditConfig()
    tuned = arch.tuned_for(model)
    cfg = replace(EditConfig(), **{**family, **(tuned.edit if tuned is not None else {})})
    if cfg.compute_dtype == "bfloat16" and not _bf16_pays(model):
        cfg = replace(cfg, compute_dtype="float32")
    return cfg


def resolve(model, **overrides) -> EditConfig:
    """``defaults_for(model)`` with the non-None ``overrides`` applied; unknown names are a TypeError."""
    unknown = set(overrides) - EditConfig.names()
    if unknown:
        raise TypeError(f"unknown editing hyperparameters: {sorted(unknown)} (known: {sorted(EditConfig.names())})")
    cfg = defaults_for(model)
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
