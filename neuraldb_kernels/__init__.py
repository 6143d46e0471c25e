"""neuraldb_kernels: the fused gated-retrieval op behind NeuralDB, with PyTorch, C++, Triton and CUDA backends.

Tensors in, tensors out: this package knows nothing about models or facts.

Example::

    >>> import torch, neuraldb_kernels
    >>> keys = torch.nn.functional.normalize(torch.randn(100, 16), dim=1).half()
    >>> out, idx, score = neuraldb_kernels.gated_retrieval(torch.randn(4, 16), keys, torch.randn(100, 8), 0.65)
"""

from neuraldb_kernels import config
from neuraldb_kernels.backends import available_backends, resolve
from neuraldb_kernels.op import gated_retrieval, gated_retrieval_prefiltered, runs_eagerly
from neuraldb_kernels.plan import (
    DEFAULT_POLICY,
    PrefilterPolicy,
    RetrievalPlan,
    plan_retrieval,
    retrieve_residuals,
)
from neuraldb_kernels.prefilter import build_signs, build_sketch, sign_row_bytes, sketch_row_bytes
from neuraldb_kernels.reference import gated_retrieval_reference, normalize_queries
from neuraldb_kernels.validation import check_gamma, check_queries

__all__ = [
    "DEFAULT_POLICY",
    "PrefilterPolicy",
    "RetrievalPlan",
    "available_backends",
    "build_signs",
    "build_sketch",
    "check_gamma",
    "check_queries",
    "config",
    "gated_retrieval",
    "gated_retrieval_prefiltered",
    "gated_retrieval_reference",
    "normalize_queries",
    "plan_retrieval",
    "resolve",
    "retrieve_residuals",
    "runs_eagerly",
    "sign_row_bytes",
    "sketch_row_bytes",
]
__version__ = "0.1.0"
