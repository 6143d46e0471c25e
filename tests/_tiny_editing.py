"""A word-level tokenizer and a tiny random Llama over the words of a few CounterFact-style facts: real editing and
evaluation code paths in well under a second per test."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from neuraldb.facts import Fact

FACTS = [
    Fact("Danielle Darrieux", "The mother tongue of {} is", "English", target_true="French"),
    Fact("Spike Hughes", "{} originates from", "Philadelphia", target_true="London"),
    Fact("Toko Yasuda", "{} plays the", "piano", target_true="guitar"),
    Fact("Apple A5", "{} was created by", "Google", target_true="Apple"),
    Fact("the Eiffel Tower", "In the city of Rome you can visit {} , which is in", "Berlin", target_true="Paris"),
]

# FACTS with paraphrases and neighborhood prompts made from the tiny tokenizer's words
EVAL_FACTS = [
    Fact(
        f.subject,
        f.prompt,
        f.target_new,
        target_true=f.target_true,
        paraphrases=(f"Because {f.text}", f"I . {f.text}"),
        neighborhood=tuple(g.text for g in FACTS if g is not f)[:3],
    )
    for f in FACTS
]


def word_llama():
    """(model, tokenizer): a 4-layer random Llama whose vocabulary is the words of FACTS plus a few fillers."""
    import tokenizers
    import transformers

    words = sorted({w for f in FACTS for w in (f.text + " " + f.target_new + " " + f.target_true).split()})
    words += ["is", "a", "The", "Therefore", "Because", "I", "You", ".", "the", "of"]
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words) - set(specials)))}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config.name_or_path = "tiny-test-llama"
    return model, tok


def facts_jsonl(path: Path, facts: list[Fact]) -> Path:
    """``facts`` as a JSONL facts file at ``path`` (the format ``neuraldb eval --facts`` reads)."""
    path.write_text("\n".join(json.dumps(dataclasses.asdict(f) | {"extras": None}) for f in facts), encoding="utf-8")
    return path
