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

OPTIONS = ("lam", "threshold", "l2", "c0_tokens", "sequential", "layers")


def wikitext_tokens_for(tok, general_dir: str | Path, requested: int | None) -> tuple[int, str | None]:
    """The WikiText-2 token budget that keeps perplexity on the first half (C0 reads the second); a note if capped."""
    from ..baselines import wikitext_half

    half = len(wikitext_half(tok, general_dir, "first"))
    if requested is not None and requested <= half:
        return requested, None
    return half, f"WikiText-2 perplexity on the first {half} tokens only (the second half estimates C0)"


def baseline_state(model, tok, facts, db, *, method: str, general_dir: str | Path | None, options: dict | None):
    """``(post, info)``: ``post()`` is a context manager with ``method``'s update in the weights (restored bitwise
    on exit); ``info`` records what was computed (for ``results.json``). Option ``layers`` (a list ending at the
    database layer) spreads the residuals over those layers (:mod:`neuraldb.baselines_spread`); default: the
    database layer alone."""
    from .. import baselines

    opts = dict(options or {})
    unknown = set(opts) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown baseline option(s) {', '.join(sorted(unknown))}; known: {', '.join(OPTIONS)}")
    layers = opts.get("layers")
    if layers is not None:
        from ..baselines_spread import check_layers

        layers = check_layers(model, layers, db.layer)
        if len(layers) > 1 and opts.get("sequential") is not None:
            raise ValueError("the sequential option is for one layer only: the spread over layers is in one batch")
    data_dir = Path(general_dir) if general_dir is not None else Path("../shared/data/general_eval")
    n_tokens = opts.get("c0_tokens", baselines.DEFAULT_C0_TOKENS)
    hp = {
        "lam": float(opts.get("lam", baselines.DEFAULT_LAMBDA)),
        "threshold": float(opts.get("threshold", baselines.DEFAULT_NULLSPACE_THRESHOLD)),
        "l2": float(opts.get("l2", baselines.DEFAULT_L2)),
    }
    c0_of = partial(baselines.key_second_moment, model, tok, data_dir=data_dir, n_tokens=n_tokens)
    if layers is None or len(layers) == 1:
        post, info = _one_layer(model, tok, facts, db, method, c0_of, hp, opts.get("sequential"))
    else:
        post, info = _spread(model, tok, facts, db, method, c0_of, hp, layers)
    evals = torch.linalg.eigvalsh(info.pop("c0_matrix").double())
    info = {
        "method": method,
        "layer": db.layer,
        "layers": layers or [db.layer],
        "keys": "raw mean of down-projection inputs (key_unit_mean=False), the database's other key settings",
        "residuals": f"the database's rows ({str(db.values.dtype).removeprefix('torch.')})",
        "c0": {
            "source": f"{data_dir / baselines.WIKITEXT_FILE}, second half of the tokens",
            "n_tokens": n_tokens,
            "eigenvalues": {"min": evals.min().item(), "median": evals.median().item(), "max": evals.max().item()},
        },
        **info,
    }
    if method == "memit":
        info["lam"] = hp["lam"]
        info["formula"] = "Delta = R K^T (lam C0 + K K^T)^-1 (MEMIT, one layer)"
    else:
        info.update(threshold=hp["threshold"], l2=hp["l2"], null_space_dim=int((evals < hp["threshold"]).sum()))
        info["formula"] = (
            "Delta = R K^T P ((K K^T + Kp Kp^T) P + l2 I)^-1, P onto eigvecs of C0 < threshold (AlphaEdit)"
        )
    if len(info["layers"]) > 1:
        info["c0"]["eigenvalues_of_layer"] = db.layer
        info["formula"] = info["formula"].replace(", one layer)", ")") + (
            f", at each of layers {info['layers']} in turn with R = (z - h) / (layers left), z = h0 + r, h the output"
            " of the database layer on the bare prompts with the earlier layers' updates in place"
        )
    return post, info


def _key_conf(db) -> dict:
    conf = db.config or {}
    return {k: conf[k] for k in ("n_prefixes", "prefix_len", "seed", "key_bare_weight", "batch_size") if k in conf}


def _one_layer(model, tok, facts, db, method, c0_of, hp, batch):
    from .. import baselines
    from ..editing import compute_keys

    t0 = time.perf_counter()
    keys = compute_keys(model, tok, facts, db.layer, template=db.template, key_unit_mean=False, **_key_conf(db))
    resid = db.values.detach().float().cpu()
    t_keys = time.perf_counter() - t0
    t0 = time.perf_counter()
    c0 = c0_of(db.layer)
    t_c0 = time.perf_counter() - t0
    t0 = time.perf_counter()
    delta = baselines.baseline_delta(method, keys, resid, c0, batch=batch, **hp)
    t_solve = time.perf_counter() - t0
    w, _ = baselines._weight_and_layout(model, db.layer)
    info = {
        "c0_matrix": c0,
        "sequential_batch": batch,
        "delta_norm": delta.norm().item(),
        "weight_norm": w.detach().float().norm().item(),
        "residual_fit": residual_fit(keys, resid, delta),
        "seconds": {"keys": t_keys, "c0": t_c0, "solve": t_solve},
    }
    return partial(baselines.weights_edited, model, db.layer, delta), info


def _spread(model, tok, facts, db, method, c0_of, hp, layers):
    from .. import baselines, baselines_spread

    t0 = time.perf_counter()
    c0s = {lay: c0_of(lay) for lay in layers}
    t_c0 = time.perf_counter() - t0
    resid = db.values.detach().float().cpu()
    t0 = time.perf_counter()
    deltas = baselines_spread.multi_layer_deltas(
        model,
        tok,
        facts,
        layers,
        resid,
        layer=db.layer,
        method=method,
        c0=c0s,
        template=db.template,
        key_settings=_key_conf(db),
        **hp,
    )
    t_solve = time.perf_counter() - t0
    fit = baselines_spread.target_fit(model, tok, facts, db.layer, resid, deltas, template=db.template)
    info = {
        "c0_matrix": c0s[db.layer],
        "sequential_batch": None,
        "delta_norm": sum(d.double().norm() ** 2 for d in deltas.values()).sqrt().item(),
        "delta_norms": {str(lay): d.norm().item() for lay, d in deltas.items()},
        "weight_norm": baselines._weight_and_layout(model, db.layer)[0].detach().float().norm().item(),
        "target_fit": fit,
        "seconds": {"c0": t_c0, "keys_and_solve": t_solve},
    }
    return partial(baselines.weights_edited, model, deltas), info


def residual_fit(keys: torch.Tensor, resid: torch.Tensor, delta: torch.Tensor) -> dict:
    """How much of each residual ``Delta k`` reproduces: mean cosine and mean norm ratio over the facts."""
    got = keys.double() @ delta.double().T
    want = resid.double()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
    ratio = got.norm(dim=1) / want.norm(dim=1).clamp_min(1e-12)
    return {"mean_cosine": cos.mean().item(), "mean_norm_ratio": ratio.mean().item()}
