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

**The 1-bit first stage** (``build_signs``, optional): a cascade signs -> int4 -> exact. Per key the signs ``s``
(``s_j = +1`` for ``k_j >= 0``, else -1), one scale ``a`` (the mean ``|k_j|`` off the outliers), the
``SIGN_OUTLIERS`` coordinates of largest ``|k_j|`` (set ``J``) stored apart as ``v_j = fp16(k_j - a s_j)``,
``r >= ||k - a s - v_J||`` and ``n >= max(||k||, ||v_J||)`` (float64, rounded up). Then::

    fp32(qn . k) <= qn . k + g(d1) ||qn|| n
                 = a (qn . s) + qn . v_J + qn . (k - a s - v_J) + g(d1) ||qn|| n
                 <= a (c (q8 . s) + ||qn - c q8||_1) + qn . v_J + ||qn|| r + g(d1) ||qn|| n

for any quantisation ``qn = c q8 + dq`` of the query (``|dq . s| <= ||dq||_1`` since ``|s_j| = 1``; one scale
``c = max |qn| / 127``, so ``q8 . s`` is an exact integer sum). The outliers matter on real keys: SmolLM2's
down_proj inputs are heavy-tailed, and without them ``||k - a s||`` is ~0.79 for a unit key (every key passes
gamma 0.65); with 24 it is ~0.55 (docs/overhead.md). A key passes the first stage unless that bound (rounding slack
included) is below gamma; the int4 bound then decides for the survivors alone.

Sign row layout (``uint8``, ``sign_row_bytes(d1)`` bytes, 300 for d1 = 1536): ``a``, ``r``, ``n`` (fp32), the
``SIGN_OUTLIERS`` indices (uint16; padding index d1 with value 0 when d1 < SIGN_OUTLIERS), their ``v_j`` (fp16),
then ``8 G`` bytes of signs: bit ``j`` of byte ``8 g + b`` is element ``64 g + 8 b + j`` (set: +1; padding: 0).
"""

from __future__ import annotations

import torch

from neuraldb_kernels.reference import best_keys, normalize_queries

SKETCH_GROUP = 64
_HEADER_BYTES = 8  # e and n, fp32
SIGN_OUTLIERS = 24  # as kSignOutliers in csrc/cpu/cpu_kernels.h
_SIGN_HEADER = 12  # a, r and n, fp32
_MAX_SIGN_D1 = 65535  # outlier indices are uint16
_U = 2.0**-24  # unit roundoff of fp32
# Keys per chunk of the reference's sketch scan (bounds its (T, chunk) score block and the decoded fp32 chunk).
_CHUNK = 4096
# Keys per chunk of build_sketch and build_signs (a few fp32/fp64 copies of the chunk exist at once).
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
    return _build_in_chunks(keys, sketch_row_bytes(keys.shape[1]), _sketch_rows)


def _build_in_chunks(keys: torch.Tensor, row_bytes: int, rows_fn) -> torch.Tensor:
    """``rows_fn`` applied to ``_BUILD_CHUNK`` keys at a time, gathered into one ``(m, row_bytes)`` table."""
    out = torch.empty((keys.shape[0], row_bytes), dtype=torch.uint8, device=keys.device)
    for start in range(0, keys.shape[0], _BUILD_CHUNK):
        out[start : start + _BUILD_CHUNK] = rows_fn(keys[start : start + _BUILD_CHUNK])
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


def sign_row_bytes(d1: int) -> int:
    """Bytes per key of the 1-bit first stage for key length ``d1`` (300 for d1 = 1536).

    Example::

        >>> sign_row_bytes(1536), sign_row_bytes(131)
        (300, 132)
    """
    return _SIGN_HEADER + 4 * SIGN_OUTLIERS + 8 * _groups(d1)


def build_signs(keys: torch.Tensor) -> torch.Tensor:
    """The 1-bit sketch of ``keys`` (m, d1): a ``(m, sign_row_bytes(d1))`` uint8 tensor on the keys' device.

    As for :func:`build_sketch`, any key values give a valid row (``r`` and ``n`` are measured).

    Example::

        >>> keys = torch.nn.functional.normalize(torch.randn(3, 100), dim=1).half()
        >>> build_signs(keys).shape
        torch.Size([3, 124])
    """
    if keys.dim() != 2:
        raise ValueError(f"keys must be 2-D (m, d1), got shape {tuple(keys.shape)}")
    if keys.shape[1] > _MAX_SIGN_D1:
        raise ValueError(f"keys must have at most {_MAX_SIGN_D1} columns for build_signs, got {keys.shape[1]}")
    return _build_in_chunks(keys, sign_row_bytes(keys.shape[1]), _sign_rows)


def _round_up_f32(x: torch.Tensor) -> torch.Tensor:
    """float64 ``x`` as the smallest fp32 values not below it (NaN stays NaN)."""
    y = x.float()
    return torch.where(y.double() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def _sign_rows(keys: torch.Tensor) -> torch.Tensor:
    m, d1 = keys.shape
    g = _groups(d1)
    k = keys.double()  # exact; float64 keeps the residual's rounding far below the 1e-9 added to its norm
    nout = min(SIGN_OUTLIERS, d1)
    top = k.abs().topk(nout, dim=1).indices
    s = torch.where(k >= 0, 1.0, -1.0).to(k.dtype)
    off = torch.ones_like(k, dtype=torch.bool).scatter_(1, top, False)
    # The mean |k_j| off the outliers minimises ||k - a s|| there; any a gives a valid bound, since r is measured.
    a = _round_up_f32((k.abs() * off).sum(dim=1) / max(d1 - nout, 1)).double()
    v = (k.gather(1, top) - a[:, None] * s.gather(1, top)).to(torch.float16)
    res = k - a[:, None] * s
    res.scatter_(1, top, res.gather(1, top) - v.double())
    up = 1 + 1e-9
    r = _round_up_f32(res.square().sum(dim=1).sqrt() * up)
    n = _round_up_f32(torch.maximum(k.square().sum(dim=1), v.double().square().sum(dim=1)).sqrt() * up)
    idx = torch.full((m, SIGN_OUTLIERS), d1, dtype=torch.int16, device=keys.device)
    idx[:, :nout] = top.to(torch.int16)  # the low 16 bits: uint16 indices as the kernel reads them
    vals = torch.zeros((m, SIGN_OUTLIERS), dtype=torch.float16, device=keys.device)
    vals[:, :nout] = v
    bits = torch.zeros((m, g * SKETCH_GROUP), dtype=torch.uint8, device=keys.device)
    bits[:, :d1] = (k >= 0).to(torch.uint8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=keys.device)
    packed = (bits.view(m, -1, 8) * weights).sum(dim=2, dtype=torch.uint8)
    out = torch.empty((m, sign_row_bytes(d1)), dtype=torch.uint8, device=keys.device)
    out[:, :_SIGN_HEADER] = torch.stack([a.float(), r, n], dim=1).contiguous().view(torch.uint8)
    o = _SIGN_HEADER + 2 * SIGN_OUTLIERS
    out[:, _SIGN_HEADER:o] = idx.contiguous().view(torch.uint8)
    out[:, o : o + 2 * SIGN_OUTLIERS] = vals.contiguous().view(torch.uint8)
    out[:, o + 2 * SIGN_OUTLIERS :] = packed
    return out


def _decode_signs(signs: torch.Tensor, d1: int) -> tuple[torch.Tensor, ...]:
    """``(s (m, d1) fp64 +-1, v_full (m, d1) fp64 (v_J, zero elsewhere), a, r, n (m,) fp64)`` of sign rows."""
    m, g = signs.shape[0], _groups(d1)
    arn = signs[:, :_SIGN_HEADER].contiguous().view(torch.float32).double()
    o = _SIGN_HEADER + 2 * SIGN_OUTLIERS
    idx = signs[:, _SIGN_HEADER:o].contiguous().view(torch.int16).int() & 0xFFFF
    vals = signs[:, o : o + 2 * SIGN_OUTLIERS].contiguous().view(torch.float16).double()
    packed = signs[:, o + 2 * SIGN_OUTLIERS :]
    shifts = torch.arange(8, dtype=torch.uint8, device=signs.device)
    bits = ((packed[:, :, None] >> shifts) & 1).reshape(m, g * SKETCH_GROUP)[:, :d1]
    s = bits.double() * 2 - 1
    # Padding indices (d1) land in a scratch column that is then cut off.
    v = torch.zeros((m, d1 + 1), dtype=torch.float64, device=signs.device)
    v.scatter_add_(1, idx.long().clamp_max(d1), vals)
    return s, v[:, :d1], arn[:, 0], arn[:, 1], arn[:, 2]


def sign_bounds(queries: torch.Tensor, signs: torch.Tensor, d1: int) -> torch.Tensor:
    """``(T, m)`` float64 upper bounds of the exact path's fp32 score ``fp32(qn . k)`` from the 1-bit rows, with the
    C++ kernel's query quantisation (one scale per row, max |qn| / 127); NaN where the query or key is not finite."""
    qn = normalize_queries(queries).double()
    amax = qn.abs().amax(dim=1, keepdim=True)
    c = (amax.float() / 127).double()
    ok = (c > 0) & c.isfinite()
    q8 = torch.where(ok, (qn / torch.where(ok, c, 1.0)).round().clamp(-127, 127), 0.0)
    l1 = (qn - c * q8).abs().sum(dim=1, keepdim=True)
    qnorm = qn.norm(dim=1, keepdim=True)
    slack = (_gamma_n(d1) + _gamma_n(SIGN_OUTLIERS)) * qnorm
    found = []
    for start in range(0, signs.shape[0], _CHUNK):
        s, v, a, r, n = _decode_signs(signs[start : start + _CHUNK], d1)
        cd = c * (q8 @ s.T)
        terms = a[None] * (cd.abs() + l1) + qnorm * r[None] + slack * n[None]
        ub = qn @ v.T + a[None] * (cd + l1) + qnorm * r[None] + slack * n[None]
        found.append(ub + 1e-9 * ((qn @ v.T).abs() + terms))
    return torch.cat(found, dim=1) if found else qn.new_zeros((qn.shape[0], 0))


def _check_rows(name: str, rows: object, keys: torch.Tensor, row_bytes: int, builder: str) -> None:
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(rows).__name__}")
    if rows.dtype != torch.uint8:
        raise TypeError(f"{name} must have dtype uint8 (from {builder}), got {rows.dtype}")
    want = (keys.shape[0], row_bytes)
    if tuple(rows.shape) != want:
        raise ValueError(f"{name} must have shape {want} ({builder} of the keys), got {tuple(rows.shape)}")
    if rows.device != keys.device:
        raise ValueError(f"{name} must be on the keys' device ({keys.device}), got {rows.device}")


def check_signs(signs: object, keys: torch.Tensor) -> None:
    """TypeError/ValueError naming ``signs`` unless it is a uint8 ``(m, sign_row_bytes(d1))`` tensor beside ``keys``
    (d1 at most 65535, as ``build_signs`` allows)."""
    if keys.dim() == 2 and keys.shape[1] > _MAX_SIGN_D1:
        raise ValueError(f"signs need keys of at most {_MAX_SIGN_D1} columns, got {keys.shape[1]}")
    _check_rows("signs", signs, keys, sign_row_bytes(keys.shape[1]), "build_signs")


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
    _check_rows("sketch", sketch, keys, sketch_row_bytes(keys.shape[1]), "build_sketch")


def _gamma_n(n: int) -> float:
    return n * _U / (1 - n * _U)


def int4_bounds(queries: torch.Tensor, sketch: torch.Tensor, d1: int) -> torch.Tensor:
    """``(T, m)`` float64 upper bounds of the exact path's fp32 score from the int4 rows (the float64 query: the C++
    kernel's int8 query adds ``||qn - qhat||`` to it); NaN where the query or key is not finite."""
    qn = normalize_queries(queries)
    qnorm = qn.double().norm(dim=1, keepdim=True)
    slack = 2 * _gamma_n(d1) * qnorm
    dq, e, n = _decode(sketch, d1)
    s = (qn @ dq.T).double()
    terms = qnorm * e[None] + slack * n[None]
    # The float64 sum may round down by a few 2^-53 of its terms; 1e-9 of them covers it.
    return s + terms + 1e-9 * (s.abs() + terms)


def candidate_keys(
    queries: torch.Tensor, sketch: torch.Tensor, d1: int, gamma: float, signs: torch.Tensor | None = None
) -> torch.Tensor:
    """Sorted indices of the keys whose bounds reach ``gamma`` for at least one row of 2-D ``queries``: a superset
    of every key whose exact fp32 score exceeds ``gamma``. With ``signs``, a key must pass the 1-bit bound and the
    int4 bound for the same row (the cascade)."""
    g32 = float(torch.tensor(gamma, dtype=torch.float32))
    found = []
    for start in range(0, sketch.shape[0], _CHUNK):
        ub = int4_bounds(queries, sketch[start : start + _CHUNK], d1)
        if signs is not None:
            ub = torch.where(sign_bounds(queries, signs[start : start + _CHUNK], d1) < g32, -torch.inf, ub)
        # NaN bounds (non-finite keys or queries) keep the key, as the kernel's !(ub < gamma).
        keep = ~(ub < g32).all(dim=0)
        found.append(keep.nonzero().flatten() + start)
    if not found:
        return torch.zeros(0, dtype=torch.int64, device=queries.device)
    return torch.cat(found)


def gated_retrieval_prefiltered_reference(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    sketch: torch.Tensor,
    signs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of the pre-filtered op for 2-D ``queries`` (behind the 1-bit stage when ``signs`` is given):
    ``(out, idx, score)`` as ``gated_retrieval_reference`` where the gate opens; ``idx = -1``, ``score = -inf``
    (and ``out = 0``) where it stays closed.

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
    cand = candidate_keys(queries, sketch, keys.shape[1], gamma, signs) if t else sketch.new_zeros(0, dtype=torch.int64)
    if cand.numel() == 0:
        return out, idx, score
    # The candidates are in increasing order, so best_keys' lowest-index rule among them is the plain op's.
    best, j = best_keys(queries, keys[cand])
    gate = best > gamma
    idx = torch.where(gate, cand[j], idx)
    score = torch.where(gate, best, score)
    out = torch.where(gate[:, None], values[cand[j]].to(queries.dtype), out)
    return out, idx, score
