"""neuraldb: edit 100,000+ facts into a Hugging Face language model with a gated neural key-value database.

Example::

    >>> import neuraldb
    >>> model, tok = neuraldb.load_model("smollm2")
    >>> db = neuraldb.edit(model, tok, [neuraldb.Fact("Danielle Darrieux", "The mother tongue of {} is", "English")])
    >>> neuraldb.patch_model(model, db)
"""

from neuraldb.architectures import down_proj_dims, down_proj_module
from neuraldb.database import NeuralKVDatabase
from neuraldb.patching import disabled, patch_info, patch_model, unpatch_model
from neuraldb.sharded import ShardedNeuralKVDatabase
from neuraldb_kernels import gated_retrieval

__all__ = ["gated_retrieval"]
__all__ += ["NeuralKVDatabase", "ShardedNeuralKVDatabase", "disabled", "patch_info", "patch_model", "unpatch_model"]
__all__ += ["down_proj_dims", "down_proj_module"]
from neuraldb import templates
from neuraldb.editing import compute_keys, compute_residuals, edit

__all__ += ["compute_keys", "compute_residuals", "edit", "templates"]
from neuraldb import facts
from neuraldb.facts import Fact
from neuraldb.models import load_model

__all__ += ["Fact", "facts", "load_model"]
__version__ = "0.1.0"
