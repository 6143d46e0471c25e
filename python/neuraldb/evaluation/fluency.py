"""ROME's fluency (weighted n-gram entropy of generations) and consistency (TF-IDF cosine to reference texts).

Fluency, as ROME/MEMIT ``compute_n_gram_entropy`` computes it: for each generated text, the bigram and trigram
frequency distributions ``g_n`` give entropies ``H_n = -sum_k g_n(k) log2 g_n(k)``; the text's score is the
arithmetic mean of the weighted entropies, ``(2/3 * H_2 + 4/3 * H_3) / 2``; a fact's score is the mean over its
generations, and tables show the mean over facts x 100 (ROME's ``summarize`` scales every metric by 100,
which is why the paper's Table 2 shows values near 620). ROME tokenises words with ``nltk.word_tokenize``;
nltk is not a dependency here, so :func:`word_tokenize` is a close regex stand-in (words, numbers, contractions
split as "do n't", and single punctuation marks).

Generations: ROME's ``generate_fast`` samples with top-k = 5 until the whole text (prompt included) is 100 tokens,
and scores the prompt plus the generation. :func:`generate_texts` does the same with ``model.generate``.

Consistency, ROME's ``tfidf_similarity``: cosine of the TF-IDF vectors of all generations of a fact joined by spaces
and of all reference texts about the new object joined by spaces. ROME fits the IDF on Wikipedia
(``idf.npy``/``tfidf_vocab.json``), which is not available offline; :class:`TfidfVectorizer` here fits the IDF on
the reference corpus you give (sklearn's smooth IDF: ``ln((1 + n) / (1 + df)) + 1``, L2-normalised vectors,
tokens = lower-cased runs of 2+ word characters), so the numbers are comparable in kind, not digit for digit.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from .scoring import progress

__all__ = [
    "TfidfVectorizer",
    "fluency_score",
    "generate_texts",
    "load_reference_texts",
    "ngram_entropy",
    "tfidf_similarity",
    "word_tokenize",
]

_WORD = re.compile(r"[A-Za-z]+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\w+(?:[.,]\d+)*|[^\w\s]", re.UNICODE)


def word_tokenize(text: str) -> list[str]:
    """Word tokens close to ``nltk.word_tokenize``: ``"Don't stop."`` -> ``['Do', "n't", 'stop', '.']``."""
    return _WORD.findall(text)


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the frequency distribution of the ``n``-grams of ``tokens`` (0 when there are none)."""
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    if total == 0:
        return 0.0
    return -sum((c / total) * math.log2(c / total) for c in grams.values())


def fluency_score(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's ``compute_n_gram_entropy`` of one text: ``mean_n(weight_n * H_n)`` (not scaled by 100)."""
    toks = word_tokenize(text)
    vals = [w * ngram_entropy(toks, n) for n, w in zip(ns, weights)]
    return sum(vals) / len(vals)


@torch.inference_mode()
def generate_texts(
    model,
    tok,
    prompts: Sequence[str],
    *,
    max_length: int = 100,
    top_k: int = 5,
    batch_size: int = 16,
    seed: int | None = 0,
    show_progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Sample one continuation per prompt with top-k sampling until prompt + generation is ``max_length`` tokens
    (ROME's ``generate_fast(..., n_gen_per_prompt=1, max_out_len=100)``); returns prompt + generation as text."""
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in progress(batches, desc=desc, enabled=show_progress):
        enc = [list(tok(prompts[i])["input_ids"]) for i in batch]
        length = max(len(e) for e in enc)
        ids = torch.full((len(enc), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, e in enumerate(enc):
            ids[r, length - len(e) :] = torch.tensor(e)
            mask[r, length - len(e) :] = 1
        new = max(1, max_length - length)
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=True,
            top_k=top_k,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=new,
            pad_token_id=pad,
        )
        for r, i in enumerate(batch):
            seq = gen[r, length - len(enc[r]) :]
            out[i] = tok.decode(seq, skip_special_tokens=True)
    return out


_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")


class TfidfVectorizer:
    """Minimal sklearn-compatible TF-IDF (smooth IDF, L2 norm, default token pattern, lower-case)."""

    def __init__(self) -> None:
        self.idf: dict[str, float] = {}
        self.default_idf = 1.0

    @staticmethod
    def tokens(text: str) -> list[str]:
        return _TFIDF_TOKEN.findall(text.lower())

    def fit(self, documents: Iterable[str]) -> TfidfVectorizer:
        df: Counter = Counter()
        n = 0
        for doc in documents:
            n += 1
            df.update(set(self.tokens(doc)))
        self.idf = {t: math.log((1 + n) / (1 + c)) + 1.0 for t, c in df.items()}
        # words never seen in the reference corpus: idf as for df = 0; they can't match a reference anyway
        self.default_idf = math.log(1 + n) + 1.0
        return self

    def transform_one(self, text: str) -> dict[str, float]:
        tf = Counter(self.tokens(text))
        vec = {t: c * self.idf.get(t, self.default_idf) for t, c in tf.items()}
        norm = math.sqrt(sum(v * v for v in vec.values()))
        return {t: v / norm for t, v in vec.items()} if norm > 0 else {}


def tfidf_similarity(text_a: str, text_b: str, vec: TfidfVectorizer) -> float:
    """Cosine of the TF-IDF vectors of two texts (ROME's ``tfidf_similarity``)."""
    a, b = vec.transform_one(text_a), vec.transform_one(text_b)
    if len(b) < len(a):
        a, b = b, a
    return float(sum(v * b.get(t, 0.0) for t, v in a.items()))


def load_reference_texts(path: str | Path) -> dict[str, list[str]]:
    """Reference texts for consistency: a JSON object (optionally .gz) mapping a key to a text or a list of texts.
    Keys are looked up as the fact's ``extras["case_id"]`` (as a string), then its ``target_new``. ROME's
    ``attribute_snippets.json`` ({relation: {target_id: [{"text": ...}]}}) is accepted and flattened by target id."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        raw = json.load(f)
    out: dict[str, list[str]] = {}

    def texts(v) -> list[str]:
        if isinstance(v, str):
            return [v]
        if isinstance(v, Mapping):
            return [v["text"]] if "text" in v else [t for x in v.values() for t in texts(x)]
        return [t for x in v for t in texts(x)]

    for k, v in raw.items():
        if isinstance(v, Mapping) and "text" not in v:  # ROME attribute_snippets: relation -> target id -> snippets
            for tid, snips in v.items():
                out.setdefault(str(tid), []).extend(texts(snips))
        else:
            out.setdefault(str(k), []).extend(texts(v))
    return out
