"""Tiny random-weight Hugging Face causal LMs, one per architecture in neuraldb's table, built offline.

``tiny_model(name)`` is deterministic (seeded) and in eval mode; ``capture(module)`` records a module's inputs and
outputs; ``separated_position(keys)`` picks a position whose activation no other position resembles and a gamma
between them, so a test can make exactly one position retrieve.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import transformers as T

VOCAB = 128
LAYERS = 3
PATCH_LAYER = 1  # a layer with one above it, so retrieval reaches the logits through more than the last layer

_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    **_TOKENS,
)


def _gemma3_multimodal() -> T.PretrainedConfig:
    return T.Gemma3Config(
        text_config=dict(_LLAMA),
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
    )


CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_LLAMA),
    "mistral": lambda: T.MistralConfig(**_LLAMA),
    "qwen2": lambda: T.Qwen2Config(**_LLAMA),
    "qwen3": lambda: T.Qwen3Config(**_LLAMA),
    "gemma": lambda: T.GemmaConfig(**_LLAMA),
    "gemma2": lambda: T.Gemma2Config(**_LLAMA),
    "gemma3_text": lambda: T.Gemma3TextConfig(**_LLAMA),
    "gemma3": _gemma3_multimodal,
    "phi3": lambda: T.Phi3Config(**_LLAMA),
    "olmo": lambda: T.OlmoConfig(**_LLAMA),
    "olmo2": lambda: T.Olmo2Config(**_LLAMA),
    "granite": lambda: T.GraniteConfig(**_LLAMA),
    "smollm3": lambda: T.SmolLM3Config(**_LLAMA),
    "phi": lambda: T.PhiConfig(**{k: v for k, v in _LLAMA.items() if k != "head_dim"}),
    "starcoder2": lambda: T.Starcoder2Config(**{k: v for k, v in _LLAMA.items() if k != "head_dim"}),
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=128, **_TOKENS),
    "gptj": lambda: T.GPTJConfig(
        vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=128, rotary_dim=4, **_TOKENS
    ),
    "gpt_neox": lambda: T.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        **_TOKENS,
    ),
    "opt": lambda: T.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        **_TOKENS,
    ),
    "falcon": lambda: T.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, **_TOKENS
    ),
}


def tiny_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> T.PreTrainedModel:
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    model = T.AutoModelForCausalLM.from_config(config) if name != "gemma3" else T.Gemma3ForConditionalGeneration(config)
    # Random init at std 0.02 leaves activations nearly identical across positions; a wider spread makes
    # positions distinguishable, as in trained models.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model.to(dtype).eval()


def prompt(length: int = 12, seed: int = 1, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Distinct tokens above the special ids, so no position repeats another's context.
    return torch.stack([torch.randperm(VOCAB - 3, generator=g)[:length] + 3 for _ in range(batch)])


@dataclass
class Captured:
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)


@contextlib.contextmanager
def capture(module: torch.nn.Module) -> Iterator[Captured]:
    """Record every call's first input and output of ``module``; registered last, so it sees patched outputs."""
    cap = Captured()

    def hook(mod, args, output):
        cap.inputs.append(args[0].detach().clone())
        cap.outputs.append(output.detach().clone())

    handle = module.register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()


def per_token(t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A captured activation as ``(batch, seq, features)`` (OPT flattens batch and sequence inside its MLP)."""
    return t.reshape(*ids.shape, t.shape[-1])


def stored_key_scores(queries: torch.Tensor, key: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Cosines the op computes between rows of ``queries`` and ``key`` stored as a unit row in ``dtype``."""
    k = key.float()
    k = (k / k.norm()).to(dtype).float()
    q = queries.float()
    return (q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ k


def separated_position(
    keys: torch.Tensor, others: torch.Tensor | None = None, candidates: range | None = None, margin: float = 0.02
) -> tuple[int, float]:
    """A position ``p`` of ``keys (T, d)`` (from ``candidates``, default: not the first or last, middle first) and
    a gamma such that only ``keys[p]`` (among ``keys`` and ``others``) scores above gamma against the stored
    ``keys[p]``."""
    t = keys.shape[0]
    order = sorted(candidates if candidates is not None else range(1, t - 1), key=lambda i: abs(i - t // 2))
    pool = keys if others is None else torch.cat([keys, others.reshape(-1, keys.shape[-1])])
    for p in order:
        scores = stored_key_scores(pool, keys[p])
        self_score = float(scores[p])
        rest = torch.cat([scores[:p], scores[p + 1 :]])
        best_other = float(rest.max()) if rest.numel() else -1.0
        if self_score - best_other > 2 * margin:
            return p, (self_score + best_other) / 2
    raise AssertionError("no position is separated from the others; change the prompt or the seed")


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def logits_and_down_proj_inputs(model, module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, q)``: the model's logits for ``x`` and ``module``'s inputs for its first sequence, ``(T, d1)``."""
    got = {}
    handle = module.register_forward_hook(lambda m, inp, out: got.__setitem__("q", inp[0][0].detach().clone()))
    try:
        with torch.no_grad():
            logits = model(x).logits
    finally:
        handle.remove()
    return logits, got["q"]
