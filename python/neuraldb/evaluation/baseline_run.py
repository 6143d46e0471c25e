"""``neuraldb eval --method memit|alphaedit``: the same facts, keys and residuals as NeuralDB's run, written into the
weights by :mod:`neuraldb.baselines` instead of a database patch.

The residuals are the database's rows (what ``neuraldb.edit`` optimised, or a saved ``--db``'s, in its storage
dtype). The keys are recomputed with the database's key settings (template, prefixes, seed, bare-prompt weight) but
as the plain mean of the raw down-projection inputs (``key_unit_mean=False``), MEMIT's ``compute_ks``: the closed
forms need keys on the scale of ``C0``. ``C0`` comes from the second half of WikiText-2's test text; ``neuraldb
eval`` scores perplexity on its leading tokens, which :func:`wikitext_tokens_for` keeps inside the first half.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch

__all__ = ["OPTIONS", "baseline_state", "residual_fit", "wikitext_tokens_for"]

OPTIONS = ("lam", "threshold", "l2", "c0_tokens", "sequential")


def wikitext_tokens_for(tok, general_dir: str | Path, requested: int | None) -> tuple[int, str | None]:
    """The WikiText-2 token budget that keeps perplexity on the first half (C0 reads the second); a note if capped."""
    from ..baselines import wikitext_half

    half = len(wikitext_half(tok, general_dir, "first"))
    if requested is not None and requested <= half:
        return requested, None
    return half, f"WikiText-2 perplexity on the first {half} tokens only (the second half estimates C0)"


def baseline_state(model, tok, facts, db, *, method: str, general_dir: str | Path | None, options: dict | None):
    """``(post, info)``: ``post()`` is a context manager with ``method``'s update in the weights (restored bitwise
    on exit); ``info`` records what was computed (for ``results.json``)."""
    from .. import baselines
    from ..editing import compute_keys

    opts = dict(options or {})
    unknown = set(opts) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown baseline option(s) {', '.join(sorted(unknown))}; known: {', '.join(OPTIONS)}")
    conf = db.config or {}
    key_conf = {k: conf[k] for k in ("n_prefixes", "prefix_len", "seed", "key_bare_weight", "batch_size") if k in conf}
    t0 = time.perf_counter()
    keys = compute_keys(model, tok, facts, db.layer, template=db.template, key_unit_mean=False, **key_conf)
    resid = db.values.detach().float().cpu()
    t_keys = time.perf_counter() - t0
    data_dir = Path(general_dir) if general_dir is not None else Path("../shared/data/general_eval")
    n_tokens = opts.get("c0_tokens", baselines.DEFAULT_C0_TOKENS)
    t0 = time.perf_counter()
    c0 = baselines.key_second_moment(model, tok, db.layer, data_dir=data_dir, n_tokens=n_tokens)
    t_c0 = time.perf_counter() - t0
    lam = float(opts.get("lam", baselines.DEFAULT_LAMBDA))
    threshold = float(opts.get("threshold", baselines.DEFAULT_NULLSPACE_THRESHOLD))
    l2 = float(opts.get("l2", baselines.DEFAULT_L2))
    batch = opts.get("sequential")
    t0 = time.perf_counter()
    delta = baselines.baseline_delta(method, keys, resid, c0, lam=lam, threshold=threshold, l2=l2, batch=batch)
    t_solve = time.perf_counter() - t0
    w, _ = baselines._weight_and_layout(model, db.layer)
    fit = residual_fit(keys, resid, delta)
    evals = torch.linalg.eigvalsh(c0.double())
    info = {
        "method": method,
        "layer": db.layer,
        "keys": "raw mean of down-projection inputs (key_unit_mean=False), the database's other key settings",
        "residuals": f"the database's rows ({str(db.values.dtype).removeprefix('torch.')})",
        "c0": {
            "source": f"{data_dir / baselines.WIKITEXT_FILE}, second half of the tokens",
            "n_tokens": n_tokens,
            "eigenvalues": {"min": evals.min().item(), "median": evals.median().item(), "max": evals.max().item()},
        },
        "sequential_batch": batch,
        "delta_norm": delta.norm().item(),
        "weight_norm": w.detach().float().norm().item(),
        "residual_fit": fit,
        "seconds": {"keys": t_keys, "c0": t_c0, "solve": t_solve},
    }
    if method == "memit":
        info["lam"] = lam
        info["formula"] = "Delta = R K^T (lam C0 + K K^T)^-1 (MEMIT, one layer)"
    else:
        info.update(threshold=threshold, l2=l2, null_space_dim=int((evals < threshold).sum()))
        info["formula"] = (
            "Delta = R K^T P ((K K^T + Kp Kp^T) P + l2 I)^-1, P onto eigvecs of C0 < threshold (AlphaEdit)"
        )
    return partial(baselines.weights_edited, model, db.layer, delta), info


def residual_fit(keys: torch.Tensor, resid: torch.Tensor, delta: torch.Tensor) -> dict:
    """How much of each residual ``Delta k`` reproduces: mean cosine and mean norm ratio over the facts."""
    got = keys.double() @ delta.double().T
    want = resid.double()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
    ratio = got.norm(dim=1) / want.norm(dim=1).clamp_min(1e-12)
    return {"mean_cosine": cos.mean().item(), "mean_norm_ratio": ratio.mean().item()}
