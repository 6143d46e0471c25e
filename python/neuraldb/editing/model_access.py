"""The model plumbing the editing engine works through: the patched layer's handles, KV caches, hooks that stop or
stub a forward, the down-projection inputs of token sequences (no-grad passes) and the editing state of a model.

Kept apart from :mod:`neuraldb.editing.engine` (the batched residual optimisation) because calibration and the
relation gate need these passes without the optimiser.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Handles:
    model: torch.nn.Module
    base: torch.nn.Module  # the decoder backbone: returns last_hidden_state after the final norm
    lm_head: torch.nn.Module
    layers: torch.nn.ModuleList
    layer: int
    down_proj: torch.nn.Module
    down_proj_path: str
    cache_kwarg: str
    softcap: float | None


def _layers_of(model: torch.nn.Module, path: str, layer: int) -> torch.nn.ModuleList:
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] == str(layer):
            try:
                mod = model.get_submodule(".".join(parts[:i]))
            except AttributeError:
                continue
            if isinstance(mod, torch.nn.ModuleList):
                return mod
    raise ValueError(f"cannot find the list of decoder layers above {path!r}")


def _backbone(model: torch.nn.Module, layers: torch.nn.ModuleList) -> torch.nn.Module:
    """The innermost module that owns ``layers`` and returns ``last_hidden_state`` (e.g. ``model.model``)."""
    best = None
    for name, mod in model.named_modules():
        if mod is model:
            continue
        if any(child is layers for child in mod.children()):
            best = mod
    if best is None:
        raise ValueError("cannot find the decoder backbone that owns the layers")
    return best


def handles(model: torch.nn.Module, layer: int) -> Handles:
    from neuraldb.architectures import cache_kwarg, down_proj_module

    path, down = down_proj_module(model, layer)
    layers = _layers_of(model, path, layer)
    base = _backbone(model, layers)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return Handles(
        model=model,
        base=base,
        lm_head=model.get_output_embeddings(),
        layers=layers,
        layer=layer,
        down_proj=down,
        down_proj_path=path,
        cache_kwarg=cache_kwarg(base),
        softcap=getattr(cfg, "final_logit_softcapping", None),
    )


def new_cache(model) -> object:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def kv_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    if hasattr(cache, "layers"):
        out = []
        for lay in cache.layers:
            k, v = getattr(lay, "keys", None), getattr(lay, "values", None)
            out.append((k, v) if isinstance(k, torch.Tensor) and k.dim() == 4 else None)
        return out
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [tuple(x[:2]) for x in cache.to_legacy_cache()]


def build_cache(model, kvs: Sequence[tuple[torch.Tensor, torch.Tensor] | None], needed: Sequence[int]):
    cache = new_cache(model)
    for i in needed:
        kv = kvs[i]
        if kv is not None:
            cache.update(kv[0], kv[1], i)
    return cache


def logits_of(h: Handles, hidden: torch.Tensor) -> torch.Tensor:
    logits = h.lm_head(hidden).float()
    if h.softcap:
        logits = torch.tanh(logits / h.softcap) * h.softcap
    return logits


@contextlib.contextmanager
def hooks(*pairs):
    handles_ = []
    try:
        for register, fn in pairs:
            handles_.append(register(fn))
        yield
    finally:
        for hd in handles_:
            hd.remove()


@contextlib.contextmanager
def stubbed_layers(layers: torch.nn.ModuleList, upto: int, hidden: torch.Tensor, tuple_out: bool):
    """Layers ``[0, upto)`` return ``hidden`` without computing anything (their output is cached)."""
    out = (hidden,) if tuple_out else hidden

    def stub(*args, **kwargs):
        return out

    patched = []
    try:
        for i in range(upto):
            layers[i].forward = stub
            patched.append(layers[i])
        yield
    finally:
        for mod in patched:
            del mod.forward


def first_output(x):
    """A module's main output: the first element when it returns a tuple (decoder layers in some versions)."""
    return x[0] if isinstance(x, (tuple, list)) else x


def by_token(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``x`` as (batch, tokens, features): some MLPs (OPT's) run on the tokens flattened to (batch * tokens, ...)."""
    return x if x.dim() == 3 else x.view(batch, -1, x.shape[-1])


class StopForward(Exception):
    pass


def right_padded(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` ``(len(seqs), longest)`` on ``device``: the sequences from column 0, ``pad_id`` after them."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s))
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def down_proj_inputs(h: Handles, seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(states, mask)``: the inputs of ``h.down_proj`` (fp32, ``(batch, length, d1)``) for token sequences ``seqs``,
    right-padded with ``pad_id`` into one batch (``mask`` marks the real tokens), from a forward that stops there."""
    device = next(h.down_proj.parameters()).device
    ids, mask = right_padded(seqs, pad_id, device)
    got = {}

    def grab(mod, inp, out):
        got["q"] = by_token(inp[0], len(seqs)).float()
        raise StopForward

    hook = h.down_proj.register_forward_hook(grab)
    try:
        h.base(input_ids=ids, attention_mask=mask, use_cache=False)
    except StopForward:
        pass
    finally:
        hook.remove()
    return got["q"], mask.bool()


def last_token_states(
    model: torch.nn.Module, tokenizer, texts: Sequence[str], layer: int, template: str | None, batch_size: int = 256
) -> torch.Tensor:
    """Unit down-projection inputs of ``layer`` (fp32 ``(n, d1)``, on the CPU) at the last token of each text inside
    ``template``; one right-padded batch per ``batch_size`` texts (padding after a token cannot reach it)."""
    from neuraldb import templates

    h = handles(model, layer)
    pad = templates.pad_id(tokenizer)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            seqs = templates.encode_batch(tokenizer, template, list(texts[start : start + batch_size]))
            q, _ = down_proj_inputs(h, seqs, pad)
            rows.append(q[torch.arange(len(seqs)), torch.tensor([len(s) - 1 for s in seqs])].cpu())
    if not rows:
        return torch.empty(0, 0)
    return torch.nn.functional.normalize(torch.cat(rows), dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Attention of the optimisation steps
# ---------------------------------------------------------------------------------------------------------------------

_STEP_ATTENTION = "neuraldb_gqa"


def _gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """Attention for a few query positions over a cached prefix, as transformers' attention interface calls it.

    The steps run 3-8 query positions over ~30 keys in ~160 rows: torch's CPU flash kernel is slow there (its bf16
    backward ~10x slower than fp32) and the math kernel copies K/V once per query head (GQA) and upcasts bf16.
    This folds each key/value head's query heads into the query axis (no K/V copies), multiplies in the inputs'
    dtype and takes the softmax in float32 (or wider). ``attention_mask`` is sdpa's boolean mask (True = attend) or None
    (causal, the queries being the last positions)."""
    B, H, Q, D = query.shape
    Hk, K = key.shape[1], key.shape[2]
    g = H // Hk
    acc = torch.promote_types(query.dtype, torch.float32)
    scores = torch.matmul(query.reshape(B, Hk, g * Q, D), key.transpose(2, 3)).to(acc).view(B, Hk, g, Q, K)
    scores = scores * (D**-0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        attention_mask = torch.ones(Q, K, dtype=torch.bool, device=query.device).tril(K - Q)
    elif attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, None]  # (B, 1, 1, Q, K) against (B, Hk, g, Q, K)
    scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, -1).to(value.dtype).view(B, Hk, g * Q, K)
    out = torch.matmul(probs, value).view(B, H, Q, D)
    return out.transpose(1, 2).contiguous(), None


def _register_step_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_STEP_ATTENTION, _gqa_attention)
    AttentionMaskInterface.register(_STEP_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def step_attention(model: torch.nn.Module):
    """The model (and its sub-configs) use :func:`_gqa_attention` inside the block."""
    cfg = model.config
    saved = cfg._attn_implementation
    _register_step_attention()
    cfg._attn_implementation = _STEP_ATTENTION
    try:
        yield
    finally:
        cfg._attn_implementation = saved


@contextlib.contextmanager
def editing_state(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, frozen weights, any neuraldb patch disabled (residuals are relative to the unedited model);
    everything restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    stack = contextlib.ExitStack()
    try:
        try:
            from neuraldb.patching import disabled, patch_info

            if patch_info(model) is not None:
                stack.enter_context(disabled(model))
        except ImportError:  # pragma: no cover
            pass
        with stack:
            yield
    finally:
        for p, g in flags:
            p.requires_grad_(g)
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device
