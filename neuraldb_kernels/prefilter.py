"""An exact int4 pre-filter for ``gated_retrieval``: a key sketch, the bound it gives, and its PyTorch reference.

At decode (T = 1) the op reads every fp16 key once, so its cost is the key bytes. A *sketch* of each key, 4-bit
codes in groups of 64 along d1 with one fp16 scale per group (``SKETCH_GROUP``), is ~27% of those bytes. For a
key ``k`` with dequantised sketch ``dq`` and ``e >= ||k - dq||`` (fp32 with a proven margin, rounded up), Cauchy-Schwarz
bounds the score the exact path computes in fp32 for a normalised query ``qn``::

    fp32(qn . k) <= qn . k + g(d1) ||qn|| ||k||                       (any fp32 summation order, g(n) = n u / (1 - n u))
               <= qn . dq + ||qn|| e + g(d1) ||qn|| n
               <= fp32(qn . dq) + ||qn|| e + 2 g(d1) ||qn|| n         (n = max(||k||, ||dq||), rounded up)

Only keys whose bound reaches gamma can open the gate, so scanning the sketch and rescoring those keys exactly
(with the exact path's arithmetic) gives the plain op's output. Every key scoring above gamma is a candidate,
hence the best of them, ties to the lowest index included, is the plain op's argmax whenever its gate opens.
Where it stays closed the pre-filtered op does not know the argmax: it returns ``idx = -1`` and
``score = -inf`` there (``out`` is zeros, as in the plain op).

Sketch row layout (``uint8``, ``sketch_row_bytes(d1)`` bytes): ``e`` (fp32), ``n`` (fp32), ``G = ceil(d1 / 64)``
fp16 scales, then ``32 G`` bytes of codes: byte ``b`` of group ``g`` holds element ``64 g + b`` in its low nibble
and ``64 g + 32 + b`` in its high nibble, each as ``code + 8`` with ``code`` in [-7, 7] (padding: code 0).
"""

from __future__ import annotations

import torch

from neuraldb_kernels.reference import best_keys, normalize_queries

SKETCH_GROUP = 64
_HEADER_BYTES = 8  # e and n, fp32
_U = 2.0**-24  # unit roundoff of fp32
# Keys per chunk of the reference's sketch scan (bounds its (T, chunk) score block and the decoded fp32 chunk).
_CHUNK = 4096
# Keys per chunk of build_sketch (a few fp32 copies of the chunk exist at once).
_BUILD_CHUNK = 1024


def _groups(d1: int) -> int:
    return -(-d1 // SKETCH_GROUP)


def sketch_row_bytes(d1: int) -> int:
    """Bytes per key of the sketch for key length ``d1`` (824 for d1 = 1536, against 3072 for fp16 keys).

    Example::

        >>> sketch_row_bytes(1536), sketch_row_bytes(131)
        (824, 112)
    """
    g = _groups(d1)
    # A multiple of 4 so the fp32 header of every row can be viewed in place.
    return -(-(_HEADER_BYTES + 34 * g) // 4) * 4


def build_sketch(keys: torch.Tensor) -> torch.Tensor:
    """The int4 sketch of ``keys`` (m, d1): a ``(m, sketch_row_bytes(d1))`` uint8 tensor on the keys' device.

    Any key values give a valid sketch (``e`` and ``n`` are measured, not assumed); unit fp16 keys give a tight one.
    Rows are processed in chunks, so the work space stays small whatever m.

    Example::

        >>> keys = torch.nn.functional.normalize(torch.randn(3, 100), dim=1).half()
        >>> s = build_sketch(keys)
        >>> s.shape, s.dtype, bool((sketch_errors(s) < 0.3).all())
        (torch.Size([3, 76]), torch.uint8, True)
    """
    if keys.dim() != 2:
        raise ValueError(f"keys must be 2-D (m, d1), got shape {tuple(keys.shape)}")
    out = torch.empty((keys.shape[0], sketch_row_bytes(keys.shape[1])), dtype=torch.uint8, device=keys.device)
    for start in range(0, keys.shape[0], _BUILD_CHUNK):
        out[start : start + _BUILD_CHUNK] = _sketch_rows(keys[start : start + _BUILD_CHUNK])
    return out


def _sketch_rows(keys: torch.Tensor) -> torch.Tensor:
    m, d1 = keys.shape
    g = _groups(d1)
    k = torch.zeros((m, g * SKETCH_GROUP), dtype=torch.float32, device=keys.device)
    k[:, :d1] = keys  # exact for fp16 / bf16 / fp32 keys
    kg = k.view(m, g, SKETCH_GROUP)
    amax = kg.abs().amax(dim=2)
    # The scale rounded up to fp16, so codes rarely clip (up to the clamp at fp16's largest value); the codes need not
    # be optimal for the bound to hold, since e is measured from them.
    want = (amax / 7).clamp_max(torch.finfo(torch.float16).max)
    scale = want.to(torch.float16)
    scale = torch.where(scale.float() < want, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    sf = scale.float()[:, :, None]
    codes = (kg / sf.clamp_min(torch.finfo(torch.float32).tiny)).round_().clamp_(-7, 7).nan_to_num_(0.0)
    dq = codes * sf  # exact: an fp16 times an integer <= 7 fits fp32
    # fp32 sums of squares: r = k - dq rounds by u |r_j|, squaring and any-order summation of the N = 64 G terms add
    # g(N + 1), so the computed norm is >= (1 - g(N + 4)) of the true one; 2 g(N + 4) up covers it, 2^-60 the
    # subnormal squares.
    up = 1 + 2 * _gamma_n(g * SKETCH_GROUP + 4)
    e = (kg - dq).square().sum(dim=(1, 2)).sqrt() * up + 2.0**-60
    n = torch.maximum(kg.square().sum(dim=(1, 2)), dq.square().sum(dim=(1, 2))).sqrt() * up + 2.0**-60
    inf = torch.tensor(float("inf"))
    header = torch.stack([torch.nextafter(e, inf), torch.nextafter(n, inf)], dim=1)

    nib = (codes + 8).to(torch.uint8).view(m, g, 2, SKETCH_GROUP // 2)
    packed = (nib[:, :, 0] | (nib[:, :, 1] << 4)).reshape(m, g * SKETCH_GROUP // 2)
    out = torch.empty((m, sketch_row_bytes(d1)), dtype=torch.uint8, device=keys.device)
    out[:, :_HEADER_BYTES] = header.contiguous().view(torch.uint8)
    out[:, _HEADER_BYTES : _HEADER_BYTES + 2 * g] = scale.contiguous().view(torch.uint8)
    out[:, _HEADER_BYTES + 2 * g : _HEADER_BYTES + 34 * g] = packed
    out[:, _HEADER_BYTES + 34 * g :] = 0
    return out


def sketch_errors(sketch: torch.Tensor) -> torch.Tensor:
    """``e`` per key (m,): the rounded-up ``||k - dequant(sketch)||`` stored in each sketch row."""
    return sketch[:, :4].contiguous().view(torch.float32).squeeze(1)


def _decode(sketch: torch.Tensor, d1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq (m, d1) fp32, e (m,) float64, n (m,) float64)`` of sketch rows."""
    m, g = sketch.shape[0], _groups(d1)
    header = sketch[:, :_HEADER_BYTES].contiguous().view(torch.float32).double()
    scale = sketch[:, _HEADER_BYTES : _HEADER_BYTES + 2 * g].contiguous().view(torch.float16).float()
    packed = sketch[:, _HEADER_BYTES + 2 * g : _HEADER_BYTES + 34 * g].view(m, g, SKETCH_GROUP // 2)
    codes = torch.cat([packed & 15, packed >> 4], dim=2).float() - 8
    dq = (codes * scale[:, :, None]).view(m, g * SKETCH_GROUP)[:, :d1]
    return dq, header[:, 0], header[:, 1]


def check_sketch(sketch: object, keys: torch.Tensor) -> None:
    """TypeError/ValueError naming ``sketch`` unless it is a uint8 ``(m, sketch_row_bytes(d1))`` tensor beside ``keys``."""
    if not isinstance(sketch, torch.Tensor):
        raise TypeError(f"sketch must be a torch.Tensor, got {type(sketch).__name__}")
    if sketch.dtype != torch.uint8:
        raise TypeError(f"sketch must have dtype uint8 (from build_sketch), got {sketch.dtype}")
    want = (keys.shape[0], sketch_row_bytes(keys.shape[1]))
    if tuple(sketch.shape) != want:
        raise ValueError(f"sketch must have shape {want} (build_sketch of the keys), got {tuple(sketch.shape)}")
    if sketch.device != keys.device:
        raise ValueError(f"sketch must be on the keys' device ({keys.device}), got {sketch.device}")


def _gamma_n(n: int) -> float:
    return n * _U / (1 - n * _U)


def candidate_keys(queries: torch.Tensor, sketch: torch.Tensor, d1: int, gamma: float) -> torch.Tensor:
    """Sorted indices of the keys whose bound reaches ``gamma`` for at least one row of 2-D ``queries``: a superset
    of every key whose exact fp32 score exceeds ``gamma``."""
    qn = normalize_queries(queries)
    qnorm = qn.double().norm(dim=1, keepdim=True)
    slack = 2 * _gamma_n(d1) * qnorm
    g32 = float(torch.tensor(gamma, dtype=torch.float32))
    found = []
    for start in range(0, sketch.shape[0], _CHUNK):
        dq, e, n = _decode(sketch[start : start + _CHUNK], d1)
        s = (qn @ dq.T).double()
        terms = qnorm * e[None] + slack * n[None]
        # The float64 sum may round down by a few 2^-53 of its terms; 1e-9 of them covers it. NaN bounds
        # (non-finite keys) stay candidates.
        ub = s + terms + 1e-9 * (s.abs() + terms)
        keep = ~(ub < g32).all(dim=0)
        found.append(keep.nonzero().flatten() + start)
    if not found:
        return torch.zeros(0, dtype=torch.int64, device=queries.device)
    return torch.cat(found)


def gated_retrieval_prefiltered_reference(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, gamma: float, sketch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of the pre-filtered op for 2-D ``queries``: ``(out, idx, score)`` as ``gated_retrieval_reference``
    where the gate opens; ``idx = -1``, ``score = -inf`` (and ``out = 0``) where it stays closed.

    Example::

        >>> keys = torch.eye(3, 4).half()
        >>> q = torch.tensor([[0.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
        >>> out, idx, score = gated_retrieval_prefiltered_reference(q, keys, torch.eye(3), 0.6, build_sketch(keys))
        >>> idx.tolist(), score.tolist(), out.tolist()
        ([1, -1], [1.0, -inf], [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    """
    t = queries.shape[0]
    out = torch.zeros((t, values.shape[1]), dtype=queries.dtype, device=queries.device)
    idx = torch.full((t,), -1, dtype=torch.int64, device=queries.device)
    score = torch.full((t,), float("-inf"), dtype=torch.float32, device=queries.device)
    cand = candidate_keys(queries, sketch, keys.shape[1], gamma) if t else sketch.new_zeros(0, dtype=torch.int64)
    if cand.numel() == 0:
        return out, idx, score
    # The candidates are in increasing order, so best_keys' lowest-index rule among them is the plain op's.
    best, j = best_keys(queries, keys[cand])
    gate = best > gamma
    idx = torch.where(gate, cand[j], idx)
    score = torch.where(gate, best, score)
    out = torch.where(gate[:, None], values[cand[j]].to(queries.dtype), out)
    return out, idx, score
