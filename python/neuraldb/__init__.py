"""neuraldb: edit 100,000+ facts into a Hugging Face language model with a gated neural key-value database.

Example::

    >>> import neuraldb
    >>> model, tok = neuraldb.load_model("smollm2")
    >>> db = neuraldb.edit(model, tok, [neuraldb.Fact("Danielle Darrieux", "The mother tongue of {} is", "English")])
    >>> # or EasyEdit's form, which also gives each fact's rewrite success (neuraldb.editing.easyedit):
    >>> # db, ok = neuraldb.edit(model, tok, prompts=["The mother tongue of Danielle Darrieux is"],
    >>> #                        target_new=["English"], subject=["Danielle Darrieux"])
    >>> neuraldb.patch_model(model, db)
    >>> db.save_pretrained("my-edits", model=model)   # later: neuraldb.from_pretrained(model, "my-edits")

The names below are imported on first use: ``import neuraldb`` alone loads neither torch nor transformers, so the
``neuraldb`` command answers Ctrl-C or a usage error in its first second with one line, not a traceback from inside
an import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from neuraldb import facts, templates
    from neuraldb.architectures import down_proj_dims, down_proj_module
    from neuraldb.calibration import calibrate, enable_relation_gate
    from neuraldb.database import NeuralKVDatabase
    from neuraldb.editing import EditResult, compute_keys, compute_residuals, edit
    from neuraldb.facts import Fact
    from neuraldb.models import load_model
    from neuraldb.patching import disabled, patch_info, patch_model, unpatch_model
    from neuraldb.pretrained import fingerprint, from_pretrained, save_pretrained
    from neuraldb.sharded import ShardedNeuralKVDatabase
    from neuraldb.subject_gate import enable_subject_gate
    from neuraldb_kernels import gated_retrieval

# Public name -> the module that defines it (a module's own name for the submodules exported as such).
_EXPORTS = {
    "gated_retrieval": "neuraldb_kernels",
    "NeuralKVDatabase": "neuraldb.database",
    "ShardedNeuralKVDatabase": "neuraldb.sharded",
    "disabled": "neuraldb.patching",
    "patch_info": "neuraldb.patching",
    "patch_model": "neuraldb.patching",
    "unpatch_model": "neuraldb.patching",
    "fingerprint": "neuraldb.pretrained",
    "from_pretrained": "neuraldb.pretrained",
    "save_pretrained": "neuraldb.pretrained",
    "down_proj_dims": "neuraldb.architectures",
    "down_proj_module": "neuraldb.architectures",
    "calibrate": "neuraldb.calibration",
    "enable_relation_gate": "neuraldb.calibration",
    "enable_subject_gate": "neuraldb.subject_gate",
    "compute_keys": "neuraldb.editing",
    "compute_residuals": "neuraldb.editing",
    "edit": "neuraldb.editing",
    "EditResult": "neuraldb.editing",
    "templates": "neuraldb.templates",
    "Fact": "neuraldb.facts",
    "facts": "neuraldb.facts",
    "load_model": "neuraldb.models",
}
__all__ = [
    "EditResult",
    "Fact",
    "NeuralKVDatabase",
    "ShardedNeuralKVDatabase",
    "calibrate",
    "compute_keys",
    "compute_residuals",
    "disabled",
    "down_proj_dims",
    "down_proj_module",
    "edit",
    "enable_relation_gate",
    "enable_subject_gate",
    "facts",
    "fingerprint",
    "from_pretrained",
    "gated_retrieval",
    "load_model",
    "patch_info",
    "patch_model",
    "save_pretrained",
    "templates",
    "unpatch_model",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'neuraldb' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name == f"neuraldb.{name}" else getattr(module, name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
