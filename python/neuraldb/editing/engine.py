"""The batched engine behind ``compute_keys`` / ``compute_residuals``: many facts, each with its own residual.

The model plumbing it works through (layer handles, KV caches, hooks, the no-grad down-projection passes) is in
:mod:`neuraldb.editing.model_access`.

Why it is fast (see docs/editing.md for the measurements):

* Positions before the subject's last token ``s`` do not depend on the residual ``r`` at any layer. One
  no-grad pass over every row (:mod:`neuraldb.editing.prepass`) computes their key/value cache (all layers), the
  layer-``l`` input at positions ``>= s``, the keys, the clamp reference norms and the KL reference distribution.
  Each optimisation step then
  runs only positions ``>= s`` (typically 3-6 tokens instead of ~20) and only layers ``>= l``: the layers below
  are replaced, for that call, by stubs that return the cached layer-``l`` input.
* Only ``r`` needs a gradient (weights are frozen); the vocabulary projection runs only on the target and KL
  positions; facts leave the batch as soon as their loss is below ``stop_loss`` (MEMIT's early stop).

Rows are laid out as :class:`neuraldb.editing.contexts.Batch` says: the subject's last token of every row at column
``P``, the suffix block (what the steps run) from there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from neuraldb.editing.contexts import Batch, call_cost, length_buckets
from neuraldb.editing.model_access import (
    Handles,
    build_cache,
    by_token,
    first_output,
    hooks,
    logits_of,
    step_attention,
    stubbed_layers,
)
from neuraldb.editing.prepass import Prepared, row_keys


class Precision:
    """The model's floating parameters in a compute dtype (e.g. bf16 on CPUs with AMX), converted once per run.

    ``with precision.compute():`` swaps the converted tensors in and puts the originals back afterwards (bit for
    bit: the originals are kept, not cast back). Buffers (RoPE's inv_freq) stay as they are. ``dtype`` is None
    when nothing needs converting."""

    def __init__(self, model: torch.nn.Module, name: str):
        dtype = getattr(torch, name)
        self.params = [p for p in model.parameters() if p.is_floating_point() and p.dtype != dtype]
        self.dtype = dtype if self.params else None
        self.low = [p.data.to(dtype) for p in self.params]

    @contextlib.contextmanager
    def compute(self):
        saved = [p.data for p in self.params]
        try:
            for p, d in zip(self.params, self.low):
                p.data = d
            yield
        finally:
            for p, d in zip(self.params, saved):
                p.data = d


# ---------------------------------------------------------------------------------------------------------------------
# Keys only (stop the forward at the edited layer)
# ---------------------------------------------------------------------------------------------------------------------


def key_pass(h: Handles, batch: Batch, offset: int = 0) -> torch.Tensor:
    """Down-projection input at the subject's last token of every row (``offset`` < 0: that many tokens before it),
    (B, d1), in float32 (:func:`neuraldb.editing.prepass.row_keys`)."""
    return row_keys(h, batch, offset)


# ---------------------------------------------------------------------------------------------------------------------
# Residual optimisation
# ---------------------------------------------------------------------------------------------------------------------


def _suffix_forward(
    h: Handles, prep: Prepared, ridx: torch.Tensor, kvs_sel, r_rows: torch.Tensor, width: int | None = None
) -> torch.Tensor:
    """Final hidden states of the first ``width`` (default: all) suffix columns for rows ``ridx`` with ``r_rows``
    added to the down-projection's output at the subject's last token; only layers >= l run."""
    b, P, l = prep.batch, prep.batch.P, h.layer
    W = b.S if width is None else width
    needed = sorted({0, *range(l, len(h.layers))})
    cache = build_cache(h.model, kvs_sel, needed)

    def add_r(mod, inp, out):
        o = first_output(out)
        t = by_token(o, len(ridx))
        return torch.cat([t[:, :1] + r_rows[:, None].to(o.dtype), t[:, 1:]], 1).reshape(o.shape)

    stub = stubbed_layers(h.layers, l, prep.h_in[ridx, :W], prep.tuple_out) if l > 0 else contextlib.nullcontext()
    with stub, step_attention(h.model), hooks((h.down_proj.register_forward_hook, add_r)):
        out = h.base(
            input_ids=b.ids[ridx, P : P + W],
            attention_mask=b.mask[ridx, : P + W],
            position_ids=b.pos[ridx, P : P + W],
            use_cache=True,
            **{h.cache_kwarg: cache},
        )
    return out.last_hidden_state


@dataclass
class OptimConfig:
    """The optimisation's settings; the first seven come from an ``EditConfig``, which holds their defaults."""

    steps: int
    lr: float
    kl_factor: float
    weight_decay: float
    clamp_norm_factor: float
    stop_loss: float
    patience: int
    extra_steps: int = 0
    warm_steps: int | None = None  # the step budget of a fact that starts from a given residual (None: steps)
    stall_tol: float = 0.02
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


def _clamped(r: torch.Tensor, max_norm: torch.Tensor) -> torch.Tensor:
    return r * torch.clamp(max_norm / r.norm(dim=-1).clamp_min(1e-12), max=1.0)[:, None]


def optimise(
    h: Handles,
    prep: Prepared,
    n_facts: int,
    cfg: OptimConfig,
    d2: int,
    stats: dict | None = None,
    on_step: Callable[[int, int], None] | None = None,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Residuals (n_facts, d2) float32 for the facts of ``prep`` (fact indices 0..n_facts-1 within the chunk).
    ``init`` (n_facts, d2): where each starts (NaN row: zero); a fact with a start gets ``cfg.warm_steps`` steps.

    ``on_step(step, finished)``, if given, is called after every step (1-based) with how many facts stopped on it;
    over the call the ``finished`` counts add up to ``n_facts``."""
    b = prep.batch
    device = b.ids.device
    rows = b.rows
    row_fact = torch.tensor([r.fact for r in rows], device=device)
    first_row = {}
    for i, r in enumerate(rows):
        if r.kl_pos < 0 and r.fact not in first_row:
            first_row[r.fact] = i
    ref_norm = prep.h_norm[torch.tensor([first_row[f] for f in range(n_facts)], device=device)]
    n_ctx = torch.zeros(n_facts, device=device)
    for r in rows:
        if r.kl_pos < 0:
            n_ctx[r.fact] += 1
    suffix = [len(r.ids) - r.subj for r in rows]
    kl_row_of = torch.full((len(rows),), -1, dtype=torch.long, device=device)
    kl_rows = [i for i, r in enumerate(rows) if r.kl_pos >= 0]
    for j, i in enumerate(kl_rows):
        kl_row_of[i] = j

    R = torch.zeros(n_facts, d2, device=device)
    budget = torch.full((n_facts,), cfg.steps, dtype=torch.long, device=device)
    if init is not None:
        warm = ~torch.isnan(init.to(device)).any(dim=-1)
        R[warm] = _clamped(init.to(device=device, dtype=R.dtype)[warm], cfg.clamp_norm_factor * ref_norm[warm])
        budget[warm] = cfg.steps if cfg.warm_steps is None else cfg.warm_steps
    m = torch.zeros_like(R)
    v = torch.zeros_like(R)
    active = torch.arange(n_facts, device=device)
    steps_taken = torch.zeros(n_facts, dtype=torch.long)
    final_loss = torch.zeros(n_facts)
    best = torch.full((n_facts,), float("inf"), device=device)
    since_best = torch.zeros(n_facts, dtype=torch.long, device=device)
    cached_sel = None
    b1, b2 = cfg.betas
    for it in range(int(budget.max()) + cfg.extra_steps):
        ending = 0
        if cfg.extra_steps == 0 and it > 0:
            # On the last step of its budget a fact stops whatever its loss, so its forward could only report that
            # loss: it is skipped (the residual is the same; the loss reported is the one before the last update).
            last = it >= budget[active] - 1
            ending = int(last.sum())
            steps_taken[active[last].cpu()] += 1
            active = active[~last]
            if active.numel() == 0 and ending and on_step is not None:
                on_step(it + 1, ending)
        if active.numel() == 0:
            break
        # rows of the active facts (in order)
        is_active = torch.zeros(n_facts, dtype=torch.bool, device=device)
        is_active[active] = True
        ridx = torch.nonzero(is_active[row_fact]).squeeze(1)
        if cached_sel is None or cached_sel[0].numel() != ridx.numel():
            # rows of similar suffix length run together: padding every row to the longest wastes ~40% of a step
            runs = [ridx[g] for g in length_buckets([suffix[i] for i in ridx.tolist()], call_cost(device))]
            sel = [[None if kv is None else (kv[0][g], kv[1][g]) for kv in prep.kvs] for g in runs]
            back = torch.argsort(torch.cat([torch.searchsorted(ridx, g) for g in runs]))
            cached_sel = (ridx, runs, sel, back)
        _, runs, sel, back = cached_sel
        # local fact index of each selected row
        local = torch.full((n_facts,), -1, dtype=torch.long, device=device)
        local[active] = torch.arange(active.numel(), device=device)
        rf = local[row_fact[ridx]]

        r_param = R[active].clone().requires_grad_(True)
        outs = []
        for g, kvs_g in zip(runs, sel):
            W = max(suffix[i] for i in g.tolist())
            o = _suffix_forward(h, prep, g, kvs_g, r_param[local[row_fact[g]]], W)
            outs.append(torch.nn.functional.pad(o, (0, 0, 0, b.S - W)))
        last = torch.cat(outs)[back]  # back in ridx order

        # NLL over target tokens
        t_row, t_col, t_id, t_w = [], [], [], []
        for j, i in enumerate(ridx.tolist()):
            r = rows[i]
            if r.targets:
                T = len(r.targets)
                for p, tid in r.targets:
                    t_row.append(j)
                    t_col.append(p - r.subj)
                    t_id.append(tid)
                    t_w.append(1.0 / T)
        t_row_t = torch.tensor(t_row, device=device)
        lp = torch.log_softmax(logits_of(h, last[t_row_t, torch.tensor(t_col, device=device)]), -1)
        tok_lp = lp.gather(1, torch.tensor(t_id, device=device)[:, None]).squeeze(1)
        nll = (
            torch.zeros(active.numel(), device=device).index_add(
                0, rf[t_row_t], -tok_lp * torch.tensor(t_w, device=device)
            )
            / n_ctx[active]
        )
        loss = nll
        # KL on the KL rows
        sel_kl = [(j, i) for j, i in enumerate(ridx.tolist()) if rows[i].kl_pos >= 0]
        if sel_kl and cfg.kl_factor:
            jj = torch.tensor([j for j, _ in sel_kl], device=device)
            cols = torch.tensor([rows[i].kl_pos - rows[i].subj for _, i in sel_kl], device=device)
            ref = prep.kl_ref[kl_row_of[torch.tensor([i for _, i in sel_kl], device=device)]]
            new = torch.log_softmax(logits_of(h, last[jj, cols]), -1)
            kl = (new.exp() * (new - ref)).sum(-1)
            loss = loss + cfg.kl_factor * torch.zeros(active.numel(), device=device).index_add(0, rf[jj], kl)
        norms = r_param.norm(dim=-1)
        loss = loss + cfg.weight_decay * norms / ref_norm[active] ** 2

        lossd = loss.detach()
        done = lossd < cfg.stop_loss
        if cfg.patience > 0:  # stop a fact whose loss has not improved by stall_tol (relative) for `patience` steps
            improved = lossd < best[active] * (1 - cfg.stall_tol)
            best[active] = torch.minimum(best[active], lossd)
            since_best[active] = torch.where(improved, 0, since_best[active] + 1)
            done |= since_best[active] >= cfg.patience
        past = it >= budget[active] - 1
        if past.any():
            # Past the step budget only a fact whose target is not yet the argmax everywhere goes on (extra_steps):
            # the facts that succeed within it are optimised exactly as without extra steps.
            missed = torch.zeros(active.numel(), device=device).index_add(
                0, rf[t_row_t], (lp.detach().argmax(-1) != torch.tensor(t_id, device=device)).float()
            )
            done |= past & ((missed == 0) | (it >= budget[active] + cfg.extra_steps - 1))
        steps_taken[active.cpu()] += 1
        final_loss[active.cpu()] = lossd.cpu()
        todo = ~done
        if on_step is not None:
            on_step(it + 1, int(done.sum()) + ending)
        if todo.any():
            grad = torch.autograd.grad(loss[todo].sum(), r_param)[0]
            a = active[todo]
            g = grad[todo]
            t = it + 1
            m[a] = b1 * m[a] + (1 - b1) * g
            v[a] = b2 * v[a] + (1 - b2) * g * g
            mhat = m[a] / (1 - b1**t)
            vhat = v[a] / (1 - b2**t)
            new_r = r_param.detach()[todo] - cfg.lr * mhat / (vhat.sqrt() + cfg.eps)
            R[a] = _clamped(new_r, cfg.clamp_norm_factor * ref_norm[a])
        active = active[todo]
    if stats is not None:
        stats.setdefault("steps", []).extend(steps_taken.tolist())
        stats.setdefault("loss", []).extend(final_loss.tolist())
    return R
