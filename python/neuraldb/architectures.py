"""What neuraldb knows about each model family, in one table, and how to find the module it edits.

``ARCHITECTURES`` maps a config's ``model_type`` to a :class:`ArchSpec`: the down-projection's path template, the
default layer (a fraction of the depth, so one entry serves every size of a family), the default gate threshold and,
for the sizes we have swept, the tuned editing hyperparameters (:class:`Tuned`). A size is recognised by what the
model *is* (its config's width, depth and MLP width, :class:`Size`), never by its name or the folder it was loaded
from: the same weights get the same defaults wherever they live, and another size of the family gets the family's.
Key and value dims are read from the module itself (input and output features), never from the config,
so a model whose config and weights disagree cannot silently get a wrong-sized database.

Example::

    >>> import neuraldb
    >>> model, tok = neuraldb.load_model("smollm2")          # doctest: +SKIP
    >>> path, module = neuraldb.down_proj_module(model, 8)   # doctest: +SKIP
    >>> path                                                 # doctest: +SKIP
    'model.layers.8.mlp.down_proj'
    >>> neuraldb.down_proj_dims(module)                      # doctest: +SKIP
    (1536, 576)
    >>> tuned_for(model).name                                # doctest: +SKIP
    'SmolLM2-135M'
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

DEFAULT_GAMMA = 0.65


@dataclass(frozen=True)
class Size:
    """The config facts that tell one size of a family from another, read from the (text) config.

    Example::

        >>> Size(hidden_size=576, num_hidden_layers=30, intermediate_size=1536).hidden_size
        576
    """

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int


@dataclass(frozen=True)
class Tuned:
    """Editing hyperparameters swept for one size of a family.

    ``edit`` overrides fields of :class:`neuraldb.editing.EditConfig`; a field it leaves out keeps the family's
    value (``layer``: the family's ``layer_fraction``; ``gamma``: the family's gamma). ``name`` is the model the sweep
    ran on, for messages and docs only: it plays no part in matching.

    Example::

        >>> t = Tuned("Tiny", Size(32, 4, 64), {"lr": 1.0})
        >>> t.edit["lr"], t.size.num_hidden_layers
        (1.0, 4)
    """

    name: str
    size: Size
    edit: Mapping[str, Any]

    def __post_init__(self) -> None:
        # read-only, so an entry cannot be changed for every later model by a caller that edits what it was given
        object.__setattr__(self, "edit", MappingProxyType(dict(self.edit)))


@dataclass(frozen=True)
class ArchSpec:
    """One model family: ``down_proj`` is a path template with ``{layer}``; ``layer_fraction`` picks the
    default layer as ``round(fraction * num_layers)``; ``gamma`` is the default gate threshold; ``tuned`` holds the
    editing defaults of the sizes that were swept (matched by :class:`Size`)."""

    down_proj: str
    layer_fraction: float = 0.25
    gamma: float = DEFAULT_GAMMA
    tuned: tuple[Tuned, ...] = ()


_LLAMA_PATH = "model.layers.{layer}.mlp.down_proj"
_LLAMA_LIKE = ArchSpec(_LLAMA_PATH)

# Sweeps on CounterFact facts 0-99 (docs/editing.md): same quality as MEMIT's lr 0.5 / 5 prefixes / 20 steps at about
# half the CPU time. Unit-length context keys with the bare prompt at 0.45: efficacy 99.5 on facts 0-199 (plain mean,
# bare 0.5: 96.0) at the same specificity; at 0.5 some key fires on every sequence. bf16 steps are 2.2x faster on
# CPUs with AMX at the same quality (float32 where bf16 is emulated: editing.defaults.defaults_for). Layer 6 was not
# swept; it is not the family's fraction (8 of 30), which patching still uses for a database that records no layer.
# Warm starts with 3 steps: 2.3x faster in fp32, 1.9x in bf16, for 200 facts appended to a large database, at the same
# efficacy and specificity and 0.5-1 point of generalization (docs/editing.md, "Warm starts").
SMOLLM2_135M = Tuned(
    "SmolLM2-135M",
    Size(hidden_size=576, num_hidden_layers=30, intermediate_size=1536),
    {"layer": 6, "gamma": 0.65, "n_prefixes": 3, "prefix_len": 10, "lr": 2.0, "steps": 10, "extra_steps": 20,
     "warm_start": True, "warm_steps": 3, "patience": 3, "key_bare_weight": 0.45, "key_unit_mean": True,
     "compute_dtype": "bfloat16"},
)  # fmt: skip

# Sweep on CounterFact facts 0-49, model in bf16 (docs/editing.md): SmolLM2's lr 2.0 overshoots here (efficacy 84);
# its keys sit closer together, so gamma 0.65 let 60% of the neighborhood prompts retrieve some row (specificity
# 80 -> 73.6); 0.75 keeps efficacy 100 / generalization 90 at specificity 78.2. The layer (5 of 18) is the family's
# fraction, not swept.
GEMMA3_270M = Tuned(
    "Gemma-3-270M",
    Size(hidden_size=640, num_hidden_layers=18, intermediate_size=2048),
    {"gamma": 0.75, "n_prefixes": 3, "prefix_len": 10, "lr": 0.5, "steps": 10, "patience": 3,
     "key_bare_weight": 0.45, "key_unit_mean": True, "compute_dtype": "bfloat16"},
)  # fmt: skip

# Layer fractions follow the layers the editing literature uses for each family (Llama-3-8B: 8 of 32,
# GPT-J: 8 of 28, GPT-2 XL: 17 of 48); families without a published choice take the Llama fraction.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(_LLAMA_PATH, tuned=(SMOLLM2_135M,)),
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": ArchSpec(_LLAMA_PATH, tuned=(GEMMA3_270M,)),
    "gemma3": ArchSpec("model.language_model.layers.{layer}.mlp.down_proj"),
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
    "phi": ArchSpec("model.layers.{layer}.mlp.fc2"),
    "starcoder2": ArchSpec("model.layers.{layer}.mlp.c_proj"),
    "gpt2": ArchSpec("transformer.h.{layer}.mlp.c_proj", layer_fraction=17 / 48),
    "gptj": ArchSpec("transformer.h.{layer}.mlp.fc_out", layer_fraction=8 / 28),
    "gpt_neox": ArchSpec("gpt_neox.layers.{layer}.mlp.dense_4h_to_h"),
    "opt": ArchSpec("model.decoder.layers.{layer}.fc2"),
    "falcon": ArchSpec("transformer.h.{layer}.mlp.dense_4h_to_h"),
}


def model_type(model: torch.nn.Module) -> str | None:
    """The ``config.model_type`` of a Hugging Face model, or None for a module without a config."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def arch_spec(model: torch.nn.Module) -> ArchSpec:
    """The table entry for ``model``; a ValueError explaining ``module=...`` for an unknown family."""
    mtype = model_type(model)
    spec = ARCHITECTURES.get(mtype) if mtype is not None else None
    if spec is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(
            f"neuraldb does not know where the MLP down-projection of model_type {mtype!r} is (known: {known}). "
            'Name it yourself, e.g. patch_model(model, db, module="model.layers.8.mlp.down_proj"): the '
            "module whose input is the MLP's hidden activation and whose output is added to the residual stream."
        )
    return spec


def _text_config(model: torch.nn.Module) -> Any:
    # a multimodal model (Gemma-3's) keeps the language model's sizes in a nested config
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(model: torch.nn.Module) -> int:
    """Number of transformer layers, from the (text) config."""
    n = getattr(_text_config(model), "num_hidden_layers", None)
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"model.config has no positive num_hidden_layers (got {n!r}); pass layer= and module=")
    return n


def default_layer(model: torch.nn.Module) -> int:
    """The layer neuraldb edits and patches in ``model`` unless told otherwise: the swept layer where the model's
    family and size were swept (:func:`tuned_for`), else ``round(layer_fraction * num_layers)``, within range.

    Editing (:func:`neuraldb.editing.defaults_for`), ``NeuralKVDatabase.for_model`` and ``patch_model`` all ask here,
    so a database built by hand and one built by ``edit`` land on the same layer.
    """
    tuned = tuned_for(model)
    if tuned is not None and "layer" in tuned.edit:
        return tuned.edit["layer"]
    spec = arch_spec(model)
    n = num_layers(model)
    return min(n - 1, int(spec.layer_fraction * n + 0.5))


def model_size(model: torch.nn.Module) -> Size | None:
    """The :class:`Size` facts of ``model``'s (text) config, or None where one is missing or not an int."""
    text_config = _text_config(model)
    facts = {n: getattr(text_config, n, None) for n in ("hidden_size", "num_hidden_layers", "intermediate_size")}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in facts.values()):
        return None
    return Size(**facts)


def tuned_for(model: torch.nn.Module) -> Tuned | None:
    """The swept editing defaults of ``model``'s family and size, or None (an unknown family, or a size never swept).

    Only what the model is counts: ``model_type`` and :func:`model_size`; its name and folder do not.

    Example::

        >>> model, tok = neuraldb.load_model("smollm2")   # doctest: +SKIP
        >>> tuned_for(model).edit["layer"]                # doctest: +SKIP
        6
    """
    mtype = model_type(model)
    spec = ARCHITECTURES.get(mtype) if mtype is not None else None
    size = model_size(model) if spec is not None and spec.tuned else None
    return next((t for t in spec.tuned if t.size == size), None) if size is not None else None


def default_gamma(model: torch.nn.Module) -> float:
    """The table's default gate threshold for ``model`` (0.65 for families without their own)."""
    mtype = model_type(model)
    spec = ARCHITECTURES.get(mtype) if mtype is not None else None
    return spec.gamma if spec is not None else DEFAULT_GAMMA


def find_module(model: torch.nn.Module, path: str) -> tuple[str, torch.nn.Module]:
    """``(path, module)`` for ``path`` in ``model``.

    A path that does not resolve exactly is matched by suffix against the model's module names, so the table's
    paths also work on wrappers (``base_model.model.…`` of PEFT) and on a bare backbone (``layers.8.…``).
    """
    if not isinstance(path, str) or not path:
        raise TypeError(f"module must be a non-empty module path string or an nn.Module, got {path!r}")
    try:
        return path, model.get_submodule(path)
    except AttributeError:
        pass
    matches = [
        (name, mod)
        for name, mod in model.named_modules()
        if name and (name.endswith("." + path) or path.endswith("." + name))
    ]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ValueError(f"module {path!r} does not exist in this {type(model).__name__}")
    names = ", ".join(n for n, _ in matches[:5])
    raise ValueError(f"module {path!r} is ambiguous in this {type(model).__name__}: it matches {names}")


def down_proj_module(model: torch.nn.Module, layer: int) -> tuple[str, torch.nn.Module]:
    """``(path, module)`` of the MLP down-projection of ``layer``: the module NeuralDB patches and whose input
    the editing code captures as keys.

    Example::

        >>> path, module = down_proj_module(model, 8)   # doctest: +SKIP
        >>> path                                        # doctest: +SKIP
        'model.layers.8.mlp.down_proj'
    """
    spec = arch_spec(model)
    check_layer(model, layer)
    return find_module(model, spec.down_proj.format(layer=layer))


def check_layer(model: torch.nn.Module, layer: object) -> int:
    """``layer`` as an int in ``[0, num_layers)``, or a TypeError/ValueError naming ``layer``."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    n = num_layers(model)
    if not 0 <= layer < n:
        raise ValueError(f"layer must be in [0, {n}) for this {n}-layer model, got {layer}")
    return layer


def down_proj_dims(module: torch.nn.Module) -> tuple[int, int]:
    """``(key_dim, value_dim)``: the input and output features of a down-projection module.

    Handles ``nn.Linear`` (and subclasses such as Falcon's) and GPT-2's ``Conv1D``, whose weight is stored
    transposed as ``(in, out)``.

    Example::

        >>> down_proj_dims(torch.nn.Linear(1536, 576))
        (1536, 576)
    """
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0]), int(weight.shape[1])
    in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(in_f, int) and isinstance(out_f, int):
        return in_f, out_f
    raise TypeError(
        f"module {type(module).__name__} is not a linear projection (nn.Linear, Conv1D or a module with "
        "in_features/out_features); neuraldb patches the MLP's down-projection"
    )


def cache_kwarg(module: torch.nn.Module) -> str:
    """The keyword under which ``module.forward`` takes a KV cache: ``"cache"`` where it has one (transformers 5.2x
    renamed it, and ``past_key_values`` goes in 5.40), else ``"past_key_values"`` (transformers 4.x and early 5.x).

    Example::

        >>> class Old(torch.nn.Module):
        ...     def forward(self, input_ids, past_key_values=None, use_cache=False): ...
        >>> cache_kwarg(Old())
        'past_key_values'
    """
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"
