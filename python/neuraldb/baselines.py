"""MEMIT's and AlphaEdit's single-layer weight updates, computed from the keys and residuals NeuralDB already makes.

Both methods write facts into the down-projection ``W`` (``(d2, d1)``) of one MLP, from the same two matrices
:func:`neuraldb.editing.compute_keys_and_residuals` returns (rows are facts; the formulas below use columns):
``K`` (``d1 x n``) the raw (not unit-normalised) down-projection inputs at the subject's last token, and ``R``
(``d2 x n``) the residuals, i.e. MEMIT's ``z - W k`` at a single layer. General knowledge enters through
``C0 = E[k k^T]`` (``d1 x d1``), the uncentred second moment of the same layer's keys over text the evaluation
does not score (:func:`key_second_moment`), as MEMIT's ``layer_stats`` ``mom2`` statistic.

* **MEMIT** (Meng et al., 2023, Eq. 14; ``kmeng01/memit`` ``memit_main.py``; NeuralDB paper App. G, Eq. 21)::

      Delta = R K^T (lam C0 + K K^T)^-1                                    (memit_delta)

  the minimiser of ``||(W + Delta) K - (W K + R)||_F^2 + lam tr(Delta C0 Delta^T)``. ``lam`` is MEMIT's
  ``mom2_update_weight`` (15,000 in the MEMIT/AlphaEdit configs for GPT-J and Llama-3-8B).
* **AlphaEdit** (Fang et al., ICLR 2025, Eq. 11-12; ``jianghoucheng/AlphaEdit`` ``AlphaEdit_main.py``; NeuralDB
  paper App. G, Eq. 22)::

      P     = U0 U0^T,  U0 = eigenvectors of C0 with eigenvalue < threshold     (null_space_projector)
      Delta = R K^T P ((K K^T + Kp Kp^T) P + l2 I)^-1                        (alphaedit_delta)

  which is the transpose of the code's ``solve(P (K K^T + cache_c) + L2 I, P K R^T)``; ``threshold`` is the code's
  ``nullspace_threshold`` (2e-2, applied to the raw eigenvalues of ``C0``), ``l2`` its ``L2`` (10) and
  ``Kp Kp^T`` its ``cache_c`` (keys of earlier batches in sequential editing; zero in one batch). It minimises
  ``||(W + dP) K - (W K + R)||^2 + l2 ||dP||^2 + ||dP Kp||^2`` over ``Delta = dP``, so ``Delta k0 = 0`` exactly for
  every ``k0`` in the span of ``C0``'s eigenvectors above the threshold.

These are the single-layer forms (the NeuralDB paper's Table 9 setting). MEMIT's spread of the residual over several
layers ending at the database layer, for both methods, is :func:`neuraldb.baselines_spread.multi_layer_deltas`.
:func:`weights_edited` adds an update (one layer's, or several layers') to the weights and restores them bitwise.

Example::

    >>> import neuraldb
    >>> from neuraldb import baselines
    >>> model, tok = neuraldb.load_model("smollm2")                                         # doctest: +SKIP
    >>> facts = [neuraldb.Fact("Danielle Darrieux", "The mother tongue of {} is", "English")]
    >>> layer = neuraldb.defaults_for(model).layer                                          # doctest: +SKIP
    >>> keys, resid = neuraldb.compute_keys_and_residuals(model, tok, facts, layer)        # doctest: +SKIP
    >>> c0 = baselines.key_second_moment(model, tok, layer)       # cached; minutes on a CPU   doctest: +SKIP
    >>> delta = baselines.memit_delta(keys, resid, c0)                                     # doctest: +SKIP
    >>> with baselines.weights_edited(model, layer, delta):                                # doctest: +SKIP
    ...     pass  # the model says "English"; on exit the weights are bitwise what they were
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_C0_TOKENS",
    "DEFAULT_L2",
    "DEFAULT_LAMBDA",
    "DEFAULT_NULLSPACE_THRESHOLD",
    "METHODS",
    "alphaedit_delta",
    "baseline_delta",
    "key_second_moment",
    "memit_delta",
    "null_space_projector",
    "weights_edited",
    "wikitext_half",
]

METHODS = ("memit", "alphaedit")
DEFAULT_LAMBDA = 15000.0  # MEMIT's mom2_update_weight (GPT-J / Llama-3-8B configs)
DEFAULT_NULLSPACE_THRESHOLD = 2e-2  # AlphaEdit's nullspace_threshold
DEFAULT_L2 = 10.0  # AlphaEdit's L2
DEFAULT_C0_TOKENS = 100_000
WIKITEXT_FILE = "wikitext2_raw_test.txt.gz"
_CACHE_FORMAT = 1


def _matrix(name: str, x: object, *, cols: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if cols is not None and x.shape[1] != cols:
        raise ValueError(f"{name} has {x.shape[1]} columns, expected {cols}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has non-finite entries")
    return x.detach().to(torch.float64)


def _keys_residuals(keys: torch.Tensor, residuals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k, r = _matrix("keys", keys), _matrix("residuals", residuals)
    if k.shape[0] == 0:
        raise ValueError("keys is empty: no facts to write")
    if r.shape[0] != k.shape[0]:
        raise ValueError(f"residuals has {r.shape[0]} rows but keys has {k.shape[0]}: one row per fact in both")
    return k.T, r.T  # columns: (d1, n), (d2, n)


def _square(name: str, x: torch.Tensor, d1: int) -> torch.Tensor:
    m = _matrix(name, x, cols=d1)
    if m.shape[0] != d1:
        raise ValueError(f"{name} must be ({d1}, {d1}) to match the keys' width, got {tuple(m.shape)}")
    return m


def memit_delta(
    keys: torch.Tensor, residuals: torch.Tensor, c0: torch.Tensor, *, lam: float = DEFAULT_LAMBDA
) -> torch.Tensor:
    """MEMIT's update ``R K^T (lam C0 + K K^T)^-1`` as a ``(d2, d1)`` float32 tensor (module docstring).

    ``keys`` (n, d1) and ``residuals`` (n, d2) have one row per fact; ``c0`` is ``E[k k^T]`` (d1, d1). Solved in
    float64."""
    k, r = _keys_residuals(keys, residuals)
    c = _square("c0", c0, k.shape[0])
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    a = lam * c + k @ k.T
    return (r @ torch.linalg.solve(a, k).T).float()  # a is symmetric: R K^T A^-1 = R (A^-1 K)^T


def null_space_projector(c0: torch.Tensor, threshold: float = DEFAULT_NULLSPACE_THRESHOLD) -> torch.Tensor:
    """AlphaEdit's projector ``U0 U0^T`` (d1, d1) onto the eigenvectors of ``c0`` whose eigenvalues are below
    ``threshold`` (the code's ``svd`` of the symmetric ``C0``; ``eigh`` here, the same subspace). float64."""
    c = _matrix("c0", c0)
    if c.shape[0] != c.shape[1]:
        raise ValueError(f"c0 must be square, got shape {tuple(c.shape)}")
    evals, evecs = torch.linalg.eigh((c + c.T) / 2)
    u0 = evecs[:, evals < threshold]
    return u0 @ u0.T


def alphaedit_delta(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    projector: torch.Tensor,
    *,
    l2: float = DEFAULT_L2,
    previous_kkt: torch.Tensor | None = None,
) -> torch.Tensor:
    """AlphaEdit's update ``R K^T P ((K K^T + Kp Kp^T) P + l2 I)^-1`` as a ``(d2, d1)`` float32 tensor.

    ``projector`` is :func:`null_space_projector`'s ``P``; ``previous_kkt`` is ``Kp Kp^T`` over the keys written by
    earlier batches (sequential editing), None for none. Solved in float64."""
    k, r = _keys_residuals(keys, residuals)
    d1 = k.shape[0]
    p = _square("projector", projector, d1)
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    m = k @ k.T
    if previous_kkt is not None:
        m = m + _square("previous_kkt", previous_kkt, d1)
    x = torch.linalg.solve(p @ m + l2 * torch.eye(d1, dtype=m.dtype), p @ k @ r.T)  # (d1, d2), the code's upd
    return x.T.float()


def baseline_delta(
    method: str,
    keys: torch.Tensor,
    residuals: torch.Tensor,
    c0: torch.Tensor,
    *,
    lam: float = DEFAULT_LAMBDA,
    threshold: float = DEFAULT_NULLSPACE_THRESHOLD,
    l2: float = DEFAULT_L2,
    batch: int | None = None,
) -> torch.Tensor:
    """The update of ``method`` ("memit" or "alphaedit") for all facts: in one batch (``batch=None``), or in
    batches of ``batch`` facts one after another (AlphaEdit's sequential evaluation). Sequentially, each batch's
    residuals are its targets minus what the earlier batches' updates already add (``R_b - Delta K_b``; the targets
    are not re-optimised on the edited model) and AlphaEdit accumulates ``Kp Kp^T`` over the earlier batches."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    _keys_residuals(keys, residuals)  # validates
    kf, rf = keys.detach().double(), residuals.detach().double()
    p = null_space_projector(c0, threshold) if method == "alphaedit" else None
    delta = torch.zeros(rf.shape[1], kf.shape[1], dtype=torch.float64)
    seen = torch.zeros(kf.shape[1], kf.shape[1], dtype=torch.float64)
    step = batch or kf.shape[0]
    for start in range(0, kf.shape[0], step):
        kb = kf[start : start + step]
        rb = rf[start : start + step] - kb @ delta.T
        if method == "memit":
            delta += memit_delta(kb, rb, c0, lam=lam).double()
        else:
            delta += alphaedit_delta(kb, rb, p, l2=l2, previous_kkt=seen if start else None).double()
            seen += kb.T @ kb
    return delta.float()


def _weight_and_layout(model: torch.nn.Module, layer: int) -> tuple[torch.Tensor, bool]:
    from neuraldb.architectures import down_proj_dims, down_proj_module

    _, module = down_proj_module(model, layer)
    d1, d2 = down_proj_dims(module)
    w = module.weight
    if tuple(w.shape) == (d2, d1):
        return w, False
    if tuple(w.shape) == (d1, d2):  # GPT-2's Conv1D stores (in, out)
        return w, True
    raise ValueError(f"the down-projection weight has shape {tuple(w.shape)}, expected ({d2}, {d1})")


def _edit_plan(model: torch.nn.Module, layer: int, delta: object) -> tuple[torch.Tensor, bool, torch.Tensor]:
    w, transposed = _weight_and_layout(model, layer)
    d2, d1 = (w.shape[1], w.shape[0]) if transposed else tuple(w.shape)
    if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != (d2, d1):
        shape = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
        raise ValueError(f"delta must be ({d2}, {d1}) for layer {layer}'s down-projection, got {shape}")
    return w, transposed, delta


@contextlib.contextmanager
def weights_edited(
    model: torch.nn.Module, layer: int | Mapping[int, torch.Tensor], delta: torch.Tensor | None = None
) -> Iterator[torch.nn.Module]:
    """Add ``delta`` ((d2, d1), from :func:`memit_delta` and the like) to layer ``layer``'s down-projection weight
    in place for the ``with`` block (the sum is formed in float32, then cast to the weight's dtype); on exit the
    weight is restored to a copy taken on entry, so it is bitwise what it was. Yields the model.

    ``weights_edited(model, {layer: delta, ...})`` edits several layers at once (MEMIT's spread,
    :func:`neuraldb.baselines_spread.multi_layer_deltas`); every delta is checked before any weight changes."""
    if isinstance(layer, Mapping):
        if delta is not None:
            raise ValueError("pass either a layer and its delta or one mapping of layer -> delta, not both")
        edits = dict(layer)
    else:
        edits = {layer: delta}
    plan = [_edit_plan(model, lay, d) for lay, d in edits.items()]
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for w, transposed, d in plan:
                saved.append((w, w.detach().clone()))
                upd = d.to(device=w.device, dtype=torch.float32)
                w.copy_((w.float() + (upd.T if transposed else upd)).to(w.dtype))
        yield model
    finally:
        with torch.no_grad():
            for w, copy in reversed(saved):
                w.copy_(copy)


def wikitext_half(tok, data_dir: str | Path, half: str = "second") -> list[int]:
    """Token ids of one half (``"first"`` or ``"second"``) of WikiText-2's raw test text (lines joined by newlines,
    as :func:`neuraldb.evaluation.general.evaluate_general` reads it). ``neuraldb eval`` scores perplexity on the
    leading tokens, so C0 comes from the second half."""
    with gzip.open(Path(data_dir) / WIKITEXT_FILE, "rt", encoding="utf-8") as f:
        text = f.read()
    ids = list(tok("\n".join(text.splitlines()), add_special_tokens=False)["input_ids"])
    if half not in ("first", "second"):
        raise ValueError(f"half must be 'first' or 'second', got {half!r}")
    return ids[: len(ids) // 2] if half == "first" else ids[len(ids) // 2 :]


def _c0_cache_path(model, layer: int, ids: list[int], window: int) -> Path:
    from neuraldb.models import cache_dir
    from neuraldb.pretrained_io import fingerprint

    text_hash = hashlib.sha256(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()[:12]
    name = f"c0-{fingerprint(model)[:16]}-layer{layer}-{len(ids)}tok-w{window}-{text_hash}-v{_CACHE_FORMAT}"
    return cache_dir() / "baselines" / f"{name}.safetensors"


def key_second_moment(
    model: torch.nn.Module,
    tok,
    layer: int,
    ids: list[int] | None = None,
    *,
    data_dir: str | Path | None = None,
    n_tokens: int | None = DEFAULT_C0_TOKENS,
    window: int = 512,
    batch_size: int = 4,
    cache: bool = True,
) -> torch.Tensor:
    """``C0 = E[k k^T]`` (d1, d1) float32: the uncentred second moment of ``layer``'s down-projection inputs over
    every token of ``ids`` (default: the first ``n_tokens`` of :func:`wikitext_half` ``"second"`` under
    ``data_dir``, default ``../shared/data/general_eval``), read in windows of ``window`` tokens. Cached under
    ``neuraldb.models.cache_dir() / "baselines"``, keyed by the model's weight fingerprint, the layer, the token
    count, the window and a hash of the token ids."""
    from neuraldb import templates
    from neuraldb.editing import model_access

    if ids is None:
        ids = wikitext_half(tok, data_dir or Path("../shared/data/general_eval"), "second")
        ids = ids[:n_tokens] if n_tokens is not None else ids
    if len(ids) < 2:
        raise ValueError("ids must hold at least 2 tokens")
    path = _c0_cache_path(model, layer, ids, window) if cache else None
    if path is not None and path.exists():
        from safetensors.torch import load_file

        return load_file(str(path))["c0"]
    h = model_access.handles(model, layer)
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    total, count = None, 0
    with model_access.editing_state(model), torch.no_grad():
        for i in range(0, len(windows), batch_size):
            states, mask = model_access.down_proj_inputs(h, windows[i : i + batch_size], templates.pad_id(tok))
            x = states[mask].double().cpu()
            total = x.T @ x if total is None else total + x.T @ x
            count += x.shape[0]
    c0 = (total / count).float()
    if path is not None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"c0": c0.contiguous()}, str(tmp), metadata={"n_tokens": str(count), "layer": str(layer)})
        tmp.replace(path)
    return c0
