"""MEMIT's spread of NeuralDB's residuals over several layers (Meng et al., 2023, Alg. 1; ``kmeng01/memit``
``memit_main.py`` ``execute_memit``), for MEMIT's and AlphaEdit's closed forms (:mod:`neuraldb.baselines`).

The target layers ``L = [l_1 < ... < l_T]`` end at the database layer ``l_T``, where NeuralDB adds the residual
``r`` to the MLP output at the subject's last token; so the target of the layer's output (the residual stream) there
is ``z = h + r``, ``h`` the unedited model's hidden state after layer ``l_T`` at that token (exact where the MLP
output enters the residual stream unchanged: all supported families but Gemma 2/3, whose post-feedforward norm
comes after the down-projection). Then, for ``i = 1..T`` in order, with the updates of the earlier layers already in
the weights:

* ``K_i``: the keys at ``l_i`` (:func:`neuraldb.editing.compute_keys`, raw means, the database's key settings; the
  context prefixes are the unedited model's, as MEMIT generates its context templates once);
* ``h_i``: the hidden state after ``l_T`` at the subject's last token of each fact's *bare* prompt, which is what
  MEMIT's code reads (``cur_zs`` from ``context_templates=[request["prompt"]]``), while its keys average contexts;
* ``R_i = (z - h_i) / (T - i + 1)``, computed as ``(r - (h_i - h))/(T - i + 1)`` so that ``R_1 = r / T`` exactly;
* ``Delta_i`` = :func:`neuraldb.baselines.baseline_delta` of ``K_i``, ``R_i`` and ``C0_i`` (MEMIT's
  ``R K^T (lam C0 + K K^T)^-1``; AlphaEdit's with the projector of that layer's ``C0_i``, as its code keeps one per
  layer), added to ``l_i``'s down-projection before ``l_{i+1}``.

Every ``C0_i`` is taken from the unedited model, before any update. With one layer this is the single-layer update
bitwise. The sequential (batched) form is not spread. :func:`neuraldb.baselines.weights_edited` applies the returned
``{layer: delta}`` and restores every layer bitwise.

Example::

    >>> from neuraldb import baselines, baselines_spread
    >>> deltas = baselines_spread.multi_layer_deltas(                                          # doctest: +SKIP
    ...     model, tok, facts, [4, 5, 6], db.values, layer=6, method="memit",
    ...     c0=lambda l: baselines.key_second_moment(model, tok, l))
    >>> with baselines.weights_edited(model, deltas):                                          # doctest: +SKIP
    ...     pass  # every layer's update in place; bitwise restored on exit
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Mapping, Sequence

import torch

from neuraldb import baselines

__all__ = ["check_layers", "multi_layer_deltas", "subject_states", "target_fit"]


def check_layers(model: torch.nn.Module, layers: object, layer: int) -> list[int]:
    """``layers`` as a list of ints, strictly increasing, in range for ``model`` and ending at ``layer`` (the
    database layer); a ValueError naming ``layers`` otherwise."""
    from neuraldb.architectures import num_layers

    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
        raise ValueError(f"layers must be a non-empty list of layer indices, got {layers!r}")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise ValueError(f"layers must hold ints, got {list(layers)!r}")
    out = list(layers)
    n = num_layers(model)
    if any(not 0 <= x < n for x in out):
        raise ValueError(f"layers {out} out of range for a model with {n} layers")
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise ValueError(f"layers must be strictly increasing, got {out}")
    if out[-1] != layer:
        raise ValueError(f"layers must end at the database layer {layer}, got {out}")
    return out


def _layer_output_pass(h, batch) -> torch.Tensor:
    from neuraldb.editing.model_access import StopForward, first_output, hooks

    got = {}

    def grab(mod, args, out):
        got["h"] = first_output(out)[:, batch.P].float()
        raise StopForward

    with hooks((h.layers[h.layer].register_forward_hook, grab)):
        try:
            h.base(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.pos, use_cache=False)
        except StopForward:
            pass
    return got["h"]


def subject_states(model, tok, facts, layer: int, *, template: str | None = None, batch_size: int = 32):
    """The output of decoder layer ``layer`` (the residual stream, fp32 ``(n, d)`` on the CPU) at the subject's last
    token of each fact's bare prompt inside ``template`` (default: the tokenizer's default template)."""
    from neuraldb import templates
    from neuraldb.editing import contexts, model_access

    tmpl = templates.default_template(tok) if template is None else templates.check(template)
    rows = [contexts.fact_rows(tok, tmpl, f, i, [""], targets=False, kl_prompt=None)[0] for i, f in enumerate(facts)]
    h = model_access.handles(model, layer)
    device, pad = model_access.model_device(model), templates.pad_id(tok)
    out = []
    with model_access.editing_state(model), torch.no_grad():
        for start in range(0, len(rows), max(1, batch_size)):
            out.append(_layer_output_pass(h, contexts.make_batch(rows[start : start + batch_size], pad, device)).cpu())
    return torch.cat(out)


def _c0s(model, layers: list[int], c0) -> dict[int, torch.Tensor]:
    from neuraldb.architectures import down_proj_dims, down_proj_module

    out = {}
    for lay in layers:
        m = c0(lay) if callable(c0) else c0[lay]
        d1 = down_proj_dims(down_proj_module(model, lay)[1])[0]
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != (d1, d1):
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"c0 for layer {lay} must be ({d1}, {d1}), got {shape}")
        out[lay] = m
    return out


def multi_layer_deltas(
    model: torch.nn.Module,
    tok,
    facts: Sequence,
    layers: Sequence[int],
    residuals: torch.Tensor,
    *,
    layer: int,
    method: str,
    c0: Callable[[int], torch.Tensor] | Mapping[int, torch.Tensor],
    template: str | None = None,
    key_settings: Mapping | None = None,
    lam: float = baselines.DEFAULT_LAMBDA,
    threshold: float = baselines.DEFAULT_NULLSPACE_THRESHOLD,
    l2: float = baselines.DEFAULT_L2,
) -> dict[int, torch.Tensor]:
    """``{l_i: Delta_i}`` ((d2, d1) float32 each) spreading ``residuals`` ((n, d2), the database's rows, one per
    fact, computed at the database layer ``layer``) over ``layers`` by ``method`` (module docstring). ``c0`` gives
    each layer's ``E[k k^T]`` (a function of the layer, e.g. :func:`neuraldb.baselines.key_second_moment`, or a
    mapping); ``key_settings`` are :func:`neuraldb.editing.compute_keys` keywords (n_prefixes, prefix_len, seed,
    key_bare_weight, batch_size). The weights are what they were on return."""
    from neuraldb.editing import compute_keys, contexts

    layers = check_layers(model, layers, layer)
    if method not in baselines.METHODS:
        raise ValueError(f"method must be one of {', '.join(baselines.METHODS)}, got {method!r}")
    r = baselines._matrix("residuals", residuals)
    if r.shape[0] != len(facts) or not len(facts):
        raise ValueError(f"residuals has {r.shape[0]} rows for {len(facts)} facts: one row per fact, at least one")
    c0s = _c0s(model, layers, c0)
    kw = dict(key_settings or {})
    states = {"template": template, "batch_size": kw.get("batch_size") or 32}
    deltas: dict[int, torch.Tensor] = {}
    with contexts.prefixes_pinned(model), contextlib.ExitStack() as applied:
        h0 = subject_states(model, tok, facts, layer, **states).double() if len(layers) > 1 else None
        for i, lay in enumerate(layers):
            keys = compute_keys(model, tok, facts, lay, template=template, key_unit_mean=False, **kw)
            moved = 0.0 if i == 0 else subject_states(model, tok, facts, layer, **states).double() - h0
            remaining = (r - moved) / (len(layers) - i)
            deltas[lay] = baselines.baseline_delta(
                method, keys, remaining, c0s[lay], lam=lam, threshold=threshold, l2=l2
            )
            if i < len(layers) - 1:
                applied.enter_context(baselines.weights_edited(model, lay, deltas[lay]))
    return deltas


def target_fit(model, tok, facts, layer: int, residuals: torch.Tensor, deltas, *, template=None) -> dict:
    """How much of each residual the applied ``deltas`` move the hidden state after the database layer ``layer`` by,
    at the subject's last token of the bare prompts: mean cosine and mean norm ratio over the facts."""
    before = subject_states(model, tok, facts, layer, template=template)
    with baselines.weights_edited(model, deltas):
        after = subject_states(model, tok, facts, layer, template=template)
    got, want = (after - before).double(), residuals.detach().double().cpu()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=1)
    ratio = got.norm(dim=1) / want.norm(dim=1).clamp_min(1e-12)
    return {"mean_cosine": cos.mean().item(), "mean_norm_ratio": ratio.mean().item()}
