"""Facts to keys and residuals (paper Eq. 18-19), batched and fast, and ``edit`` that puts them in a database.

Example::

    >>> import neuraldb
    >>> model, tok = neuraldb.load_model("smollm2")                                   # doctest: +SKIP
    >>> facts = [neuraldb.Fact("Danielle Darrieux", "The mother tongue of {} is", "English")]
    >>> db = neuraldb.edit(model, tok, facts)                                          # doctest: +SKIP
    >>> neuraldb.patch_model(model, db)                                                # doctest: +SKIP

See docs/editing.md for what makes it fast and the per-model defaults.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, overload

import torch

from neuraldb import templates
from neuraldb.editing import engine, model_access, prepass
from neuraldb.editing.contexts import context_mean, context_texts, fact_rows, generate_prefixes, make_batch
from neuraldb.editing.defaults import EditConfig, defaults_for, recorded, resolve
from neuraldb.editing.easyedit import EditResult, facts_from_lists, rewrite_success
from neuraldb.editing.easyedit import as_facts as _as_facts
from neuraldb.editing.previous_keys import previous_token_keys
from neuraldb.editing.progress import EditProgress, ProgressSpec
from neuraldb.editing.warm import ResidualBank, check_init
from neuraldb.facts import Fact
from neuraldb.pretrained_io import check_model, model_identity, recorded_identity

if TYPE_CHECKING:
    from neuraldb.database import NeuralKVDatabase

__all__ = [
    "EditConfig",
    "EditResult",
    "JobMismatchError",
    "check_resume",
    "compute_keys",
    "compute_keys_and_residuals",
    "compute_residuals",
    "defaults_for",
    "edit",
    "edit_checkpointed",
    "facts_fingerprint",
    "job_record",
    "merge_databases",
]


def _run(
    model, tok, facts, cfg: EditConfig, template, *, want_residuals: bool, progress: ProgressSpec, stats, init=None
):
    facts = _as_facts(facts)
    if cfg.layer is None:
        raise ValueError("layer is unknown for this model: pass layer=")
    h = model_access.handles(model, cfg.layer)
    d1, d2 = _dims(h)
    if not facts:
        return torch.zeros(0, d1), (torch.zeros(0, d2) if want_residuals else None)
    bar = EditProgress(progress, len(facts), "editing" if want_residuals else "keys")
    try:
        return _run_facts(model, tok, facts, cfg, template, h, want_residuals, bar, stats, init)
    finally:
        bar.close()


def _run_facts(model, tok, facts, cfg, template, h, want_residuals: bool, bar: EditProgress, stats, init):
    d1, d2 = _dims(h)
    check_init(init, len(facts), d2)
    bar.status("generating prefixes")
    prefixes = generate_prefixes(model, tok, n=cfg.n_prefixes, length=cfg.prefix_len, template=template, seed=cfg.seed)
    contexts = context_texts(prefixes)
    device = model_access.model_device(model)
    pad = templates.pad_id(tok)
    opt = engine.OptimConfig(
        steps=cfg.steps,
        lr=cfg.lr,
        kl_factor=cfg.kl_factor,
        weight_decay=cfg.weight_decay,
        clamp_norm_factor=cfg.clamp_norm_factor,
        stop_loss=cfg.stop_loss,
        patience=cfg.patience,
        extra_steps=cfg.extra_steps,
        warm_steps=cfg.warm_steps,
    )
    kl_prompt = cfg.kl_prompt if (want_residuals and cfg.kl_factor) else None
    fact_rows_all = [
        fact_rows(tok, template, f, 0, contexts, targets=want_residuals, kl_prompt=kl_prompt) for f in facts
    ]
    # Facts with similar suffix (subject's last token to the end) and prefix lengths go in the same batch, so the
    # padding the optimisation steps compute on stays small; results go back in the original order.
    order = sorted(
        range(len(facts)),
        key=lambda i: (max(len(r.ids) - r.subj for r in fact_rows_all[i]), max(r.subj for r in fact_rows_all[i])),
    )
    keys = torch.zeros(len(facts), d1)
    resid = torch.zeros(len(facts), d2) if want_residuals else None
    steps_of = [0] * len(facts)
    loss_of = [0.0] * len(facts)
    bs = max(1, cfg.batch_size)
    n_batches = -(-len(facts) // bs)
    precision = engine.Precision(model, cfg.compute_dtype) if want_residuals else None
    for b, start in enumerate(range(0, len(facts), bs)):
        batch_label = f"batch {b + 1}/{n_batches}"
        chunk = order[start : start + bs]
        rows = []
        for j, i in enumerate(chunk):
            for r in fact_rows_all[i]:
                r.fact = j
                rows.append(r)
        batch = make_batch(rows, pad, device)
        idx = torch.tensor(chunk)
        if want_residuals:
            bar.status(f"{batch_label} preparing")
            prep = prepass.prepare(h, batch, precision)
            row_keys = prep.keys
            on_step = functools.partial(bar.step, batch_label, opt.steps + opt.extra_steps, len(chunk))
            st: dict = {}
            with precision.compute():
                start = None if init is None else init[idx]
                resid[idx] = engine.optimise(h, prep, len(chunk), opt, d2, st, on_step=on_step, init=start).cpu()
            for j, i in enumerate(chunk):
                steps_of[i], loss_of[i] = st["steps"][j], st["loss"][j]
            del prep
        else:
            row_keys = engine.key_pass(h, batch)
        keys[idx] = context_mean(row_keys, rows, len(chunk), len(contexts), cfg).cpu()
        if not want_residuals:
            bar.finished(len(chunk))
    if stats is not None and want_residuals:
        stats.setdefault("steps", []).extend(steps_of)
        stats.setdefault("loss", []).extend(loss_of)
    return keys, resid


def _dims(h) -> tuple[int, int]:
    from neuraldb.architectures import down_proj_dims

    return down_proj_dims(h.down_proj)


def _template_for(tok, template):
    return templates.default_template(tok) if template is None else templates.check(template)


def compute_keys(
    model,
    tok,
    facts: Sequence[Fact],
    layer: int | None = None,
    *,
    n_prefixes: int | None = None,
    prefix_len: int | None = None,
    batch_size: int | None = None,
    template: str | None = None,
    seed: int | None = None,
    key_bare_weight: float | None = None,
    key_unit_mean: bool | None = None,
) -> torch.Tensor:
    """Keys (n, d1) float32 (paper Eq. 18): the down-projection input of ``layer`` at the subject's last token,
    averaged over the bare prompt and ``n_prefixes`` model-generated prefixes, all inside ``template``
    (default: :func:`neuraldb.templates.default_template`)."""
    cfg = resolve(
        model,
        layer=layer,
        n_prefixes=n_prefixes,
        prefix_len=prefix_len,
        batch_size=batch_size,
        seed=seed,
        key_bare_weight=key_bare_weight,
        key_unit_mean=key_unit_mean,
    )
    with model_access.editing_state(model), torch.no_grad():
        k, _ = _run(
            model, tok, facts, cfg, _template_for(tok, template), want_residuals=False, progress=False, stats=None
        )
    return k


def compute_keys_and_residuals(
    model,
    tok,
    facts: Sequence[Fact],
    layer: int | None = None,
    *,
    template: str | None = None,
    progress: ProgressSpec = False,
    stats: dict | None = None,
    init: torch.Tensor | None = None,
    **hparams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (n, d1) and residuals (n, d2), float32, from one pass (the residual rows contain the key rows).

    ``hparams`` are :class:`EditConfig` fields (steps, lr, kl_factor, weight_decay, clamp_norm_factor,
    stop_loss, n_prefixes, prefix_len, seed, kl_prompt, batch_size). ``stats``, if a dict, receives per-fact
    ``steps`` and final ``loss`` lists (the loss before the last update for a fact that used its whole budget). ``init`` (n, d2): where each residual starts (a NaN row: zero), those facts
    taking ``warm_steps`` steps (:mod:`neuraldb.editing.warm`).
    """
    cfg = resolve(model, layer=layer, **hparams)
    with model_access.editing_state(model):
        t = _template_for(tok, template)
        return _run(model, tok, facts, cfg, t, want_residuals=True, progress=progress, stats=stats, init=init)


def compute_residuals(
    model,
    tok,
    facts: Sequence[Fact],
    layer: int | None = None,
    *,
    steps: int | None = None,
    lr: float | None = None,
    kl_factor: float | None = None,
    weight_decay: float | None = None,
    clamp_norm_factor: float | None = None,
    batch_size: int | None = None,
    template: str | None = None,
    **hparams,
) -> torch.Tensor:
    """Residuals (n, d2) float32 (paper Eq. 19 / MEMIT compute_z): the vector added to ``layer``'s MLP output at
    the subject's last token of every context (prefix + prompt + target[:-1]) that makes the target likely.

    Loss per fact: mean NLL of the whole target over the contexts + ``kl_factor`` x KL(edited || unedited) on
    ``"{subject} is a"`` + ``weight_decay`` x ||r|| / ||h||^2; Adam; ||r|| clamped to ``clamp_norm_factor`` x ||h||
    (h: the layer's output at the subject's last token of the bare prompt); a fact stops once its loss is below
    ``stop_loss``.
    """
    _, r = compute_keys_and_residuals(
        model,
        tok,
        facts,
        layer,
        template=template,
        steps=steps,
        lr=lr,
        kl_factor=kl_factor,
        weight_decay=weight_decay,
        clamp_norm_factor=clamp_norm_factor,
        batch_size=batch_size,
        **hparams,
    )
    return r


@overload
def edit(model, tok, facts: Iterable[Fact] | Fact, **options: Any) -> NeuralKVDatabase: ...


@overload
def edit(
    model, tok, facts: None = None, *, prompts: Sequence[str] | str, target_new: Sequence[str] | str,
    subject: Sequence[str] | str, ground_truth: Sequence[str | None] | str | None = None, **options: Any,
) -> EditResult: ...  # fmt: skip


def edit(
    model,
    tok,
    facts: Iterable[Fact] | Fact | None = None,
    *,
    prompts: Sequence[str] | str | None = None,
    target_new: Sequence[str] | str | None = None,
    subject: Sequence[str] | str | None = None,
    ground_truth: Sequence[str | None] | str | None = None,
    layer: int | None = None,
    gamma: float | None = None,
    db=None,
    batch_size: int | None = None,
    progress: ProgressSpec = True,
    template: str | None = None,
    stats: dict | None = None,
    force: bool = False,
    **hparams,
):
    """Edit ``facts`` into a :class:`~neuraldb.NeuralKVDatabase` (a new one, or appended to ``db``).

    The database records ``layer``, ``gamma``, ``template``, ``model_id``, ``module_path``, ``config`` (the
    :class:`EditConfig` used) and ``model_identity`` (the architecture and weights fingerprint of ``model``), and
    stores each Fact as the metadata of its id. Appending to a ``db`` made for other weights or another architecture
    is a :class:`~neuraldb.pretrained.ModelMismatchError` before any work, unless ``force=True`` (a warning); a
    ``db`` without a recorded identity (an older file) is checked by its base model's Hub id where both sides have
    one, and records ``model``'s from then on. Appending to ``db`` reuses its
    layer, template and config unless overridden (a different layer or template is an error), except
    ``compute_dtype``, which is this machine's choice (:func:`neuraldb.editing.defaults.native_bf16`): the keys do
    not depend on it. The model is left as it was (mode, requires_grad, patch).

    ``stats``, if a dict, receives ``seconds``, ``n`` and per-fact optimisation ``steps`` and final ``loss``.
    ``progress``: True shows a bar (unit ``fact``) that advances as each fact stops optimising, its postfix showing
    the batch, the optimisation step and an upper bound on the time left; a callable is called instead with the
    number of facts that just finished (several times per batch); a tqdm bar of the caller's is advanced in place
    (one bar over several calls, as :func:`edit_checkpointed` keeps). See :mod:`neuraldb.editing.progress`.

    Returns the database; ``db.ids()[-len(facts):]`` are the new facts' ids, in order.

    EasyEdit's form: ``db, ok = edit(model, tok, prompts=[...], target_new=[...], subject=[...])`` (parallel lists,
    each prompt written out with its subject; optional ``ground_truth``) edits those facts with the same options
    and returns an :class:`EditResult`: the database and each fact's rewrite success, whether the model patched with
    it continues the prompt greedily with the target (:mod:`neuraldb.editing.easyedit`).
    """
    from neuraldb.database import NeuralKVDatabase

    lists = {"prompts": prompts, "target_new": target_new, "subject": subject, "ground_truth": ground_truth}
    if facts is None:
        missing = [name for name in ("prompts", "target_new", "subject") if lists[name] is None]
        if missing:
            raise TypeError(
                f"edit() needs facts, or prompts=, target_new= and subject= (missing: {', '.join(missing)})"
            )
        facts = facts_from_lists(prompts, target_new, subject, ground_truth)
        options = {"layer": layer, "gamma": gamma, "db": db, "batch_size": batch_size, "progress": progress}
        options |= {"template": template, "stats": stats, "force": force}
        db = edit(model, tok, facts, **options, **hparams)
        return EditResult(db, rewrite_success(model, tok, db, facts))
    given = [name for name, value in lists.items() if value is not None]
    if given:
        raise TypeError(f"edit() takes facts or {'/'.join(lists)}=, not both (got facts and {', '.join(given)})")
    facts = _as_facts(facts)
    if db is not None:
        if not isinstance(db, NeuralKVDatabase):
            raise TypeError(f"db must be a neuraldb.NeuralKVDatabase, got {type(db).__name__}")
        check_model(model, recorded_identity(db), force=force, source="db", warn_unverifiable=False)
        if layer is not None and db.layer is not None and layer != db.layer:
            raise ValueError(f"db was built at layer {db.layer}; cannot append facts edited at layer {layer}")
        if template is not None and db.template is not None and template != db.template:
            raise ValueError(f"db was built with template {db.template!r}; cannot append with {template!r}")
        layer = layer if layer is not None else db.layer
        template = template if template is not None else db.template
        inherited = EditConfig.names() - {"layer", "gamma", "compute_dtype"}
        base = recorded(db.config, inherited)
        hparams = {**base, **{k: v for k, v in hparams.items() if v is not None}}
        if gamma is None:
            gamma = db.gamma
    if batch_size is not None:
        hparams["batch_size"] = batch_size
    cfg = resolve(model, layer=layer, gamma=gamma, **hparams)
    template = _template_for(tok, template)
    t0 = time.perf_counter()
    stats = {} if stats is None else stats
    init = ResidualBank.from_database(db).starts(facts) if cfg.warm_start and db is not None else None
    hp = {k: v for k, v in cfg.to_dict().items() if k not in ("layer", "gamma")}
    keys, resid = compute_keys_and_residuals(
        model, tok, facts, cfg.layer, template=template, progress=progress, stats=stats, init=init, **hp
    )
    elapsed = time.perf_counter() - t0
    h = model_access.handles(model, cfg.layer)
    d1, d2 = _dims(h)
    if db is None:
        db = NeuralKVDatabase(d1, d2)
    if db.layer is None:
        db.layer = cfg.layer
    if db.gamma is None and cfg.gamma is not None:
        db.gamma = cfg.gamma
    if db.template is None:
        db.template = template
    if db.model_id is None:
        db.model_id = getattr(model.config, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if db.model_identity is None:
        db.model_identity = model_identity(model)
    if db.module_path is None:
        db.module_path = h.down_proj_path
    conf = dict(db.config or {})
    conf.update({k: v for k, v in cfg.to_dict().items() if k not in ("layer", "gamma")})
    db.config = conf
    gate, gate_keys = db.relation_gate, None
    if gate is not None and gate.get("offset", 0) < 0:  # the subject gate: new rows get their previous-token keys
        gate_keys = previous_token_keys(model, tok, facts, cfg.layer, template=db.template, config=cfg)
    db.add(keys, resid, facts=facts, relation_keys=gate_keys)
    stats.update(seconds=elapsed, n=len(facts))
    return db


# at the end: jobs builds on edit() above
from neuraldb.editing.jobs import (
    JobMismatchError,
    check_resume,
    edit_checkpointed,
    facts_fingerprint,
    job_record,
    merge_databases,
)
