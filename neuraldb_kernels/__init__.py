"""neuraldb_kernels: the fused gated-retrieval op behind NeuralDB, with PyTorch, C++, Triton and CUDA backends.

Tensors in, tensors out: this package knows nothing about models or facts.

Example::

    >>> import torch, neuraldb_kernels
    >>> keys = torch.nn.functional.normalize(torch.randn(100, 16), dim=1).half()
    >>> out, idx, score = neuraldb_kernels.gated_retrieval(torch.randn(4, 16), keys, torch.randn(100, 8), 0.65)
"""

from neuraldb_kernels import config
from neuraldb_kernels.backends import available_backends
from neuraldb_kernels.op import gated_retrieval, gated_retrieval_prefiltered
from neuraldb_kernels.plan import (
    DEFAULT_POLICY,
    PrefilterPolicy,
    RetrievalPlan,
    plan_retrieval,
    retrieve_residuals,
)
from neuraldb_kernels.prefilter import build_signs, build_sketch
from neuraldb_kernels.reference import gated_retrieval_reference

__all__ = [
    "DEFAULT_POLICY",
    "PrefilterPolicy",
    "RetrievalPlan",
    "available_backends",
    "build_signs",
    "build_sketch",
    "config",
    "gated_retrieval",
    "gated_retrieval_prefiltered",
    "gated_retrieval_reference",
    "plan_retrieval",
    "retrieve_residuals",
]
__version__ = "0.1.0"
