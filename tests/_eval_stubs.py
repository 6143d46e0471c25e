"""Tiny stand-ins for a tokenizer and a causal LM with known next-token probabilities (a bigram table)."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import torch
from torch import nn


class StubTokenizer:
    """Word-level: a token is an optional leading space plus a run of non-spaces (like byte-level BPE at word
    boundaries). Ids are assigned on first sight; id 0 is padding/EOS; id 1 is BOS when ``bos`` is set."""

    def __init__(self, bos: bool = False):
        self.vocab = {"<pad>": 0, "<bos>": 1}
        self.inv = {0: "<pad>", 1: "<bos>"}
        self.bos = bos
        self.pad_token_id = 0
        self.eos_token_id = 0

    def id(self, piece: str) -> int:
        if piece not in self.vocab:
            self.vocab[piece] = len(self.vocab)
            self.inv[self.vocab[piece]] = piece
        return self.vocab[piece]

    def __call__(self, text: str, add_special_tokens: bool = True):
        ids = [self.id(p) for p in re.findall(r" ?\S+| +$", text)]
        if add_special_tokens and self.bos:
            ids = [1, *ids]
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return "".join(self.inv[i] for i in ids if not (skip_special_tokens and i in (0, 1)))


class BigramLM(nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: the next-token distribution depends on the last token only."""

    def __init__(self, vocab_size: int = 64):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(vocab_size, vocab_size), requires_grad=False)
        self.calls = []

    def set_next(self, prev: int, probs: dict[int, float]) -> None:
        """Next-token distribution after ``prev``: the given probabilities, the rest spread evenly."""
        v = self.table.shape[1]
        rest = (1.0 - sum(probs.values())) / (v - len(probs))
        row = torch.full((v,), math.log(rest))
        for k, p in probs.items():
            row[k] = math.log(p)
        self.table.data[prev] = row

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, **kw):
        self.calls.append(tuple(input_ids.shape))
        logits = self.table[input_ids]
        if isinstance(logits_to_keep, torch.Tensor):  # positions, as transformers takes them
            logits = logits[:, logits_to_keep]
        elif logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits)
