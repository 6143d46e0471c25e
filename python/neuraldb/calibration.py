"""Per-row gate thresholds fitted from the database's own positives and negatives (``neuraldb calibrate``).

A row's key is read at its subject's last token, so ordinary text opens its gate where a token's state resembles
that one: a subject ending in a common word ("... 200", "... Tower") fires on that word in any text, and more
such rows accumulate as the database grows. A threshold of the row's own, above gamma only where needed, shuts
those openings while the row's own prompt still opens it. For each row ``j`` whose fact is a
:class:`~neuraldb.facts.Fact`:

- its positive ``p_j``: the cosine between its key and the state of its own prompt, bare (no prefix), in the
  database's template;
- its negatives, the best cosines ``> gamma`` of states whose best row is ``j``: every position of the calibration
  text (windows of raw tokens, as perplexity is scored), the other rows' own prompts (a fact must not answer another
  fact's prompt), every other position of every fact's own prompt + target tokens (:func:`sequence_negatives_of`:
  a fact must not answer inside another fact's question either), and, for subjects of several words, the subject's
  last word alone after a few function words ("in Tower", "the Tower"; scored against row ``j`` whatever the best
  row) -- ``n_j`` is the largest;
- ``t_j = min(n_j + delta, p_j - margin)`` where that is above gamma, else -1 (gamma alone). Where
  ``n_j + delta > p_j - margin`` the row cannot be separated from its negatives at this position; it keeps
  ``p_j - margin`` (its own prompt first) and is counted in ``conflicts``.

Every fitted threshold replaces the row's old one; rows without a Fact keep theirs. The text used to calibrate and
the text used to evaluate must differ (``skip`` moves past the calibration part of one corpus).

Over 400 lines because the fit is one pass over four kinds of negatives that share the state extraction and
the best-row scoring; split apart, each file would import the other's private helpers.

Example::

    >>> report = calibrate(model, tok, db, [open("corpus.txt").read()], tokens=65536)   # doctest: +SKIP
    >>> print(report.summary())                                                            # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from neuraldb import templates
from neuraldb.database import NeuralKVDatabase
from neuraldb.database_state import DatabaseChangedError, recorded_layer
from neuraldb.facts import Fact
from neuraldb.text_files import read_text

# Function words put before a subject's last word to make its negatives: the contexts where a common word most
# often appears on its own.
FUNCTION_WORDS = ("in", "the", "of", "and", "a")
DEFAULT_TOKENS = 65536
DEFAULT_WINDOW = 512
# Scores per matrix product: bounds the (states x keys) temporaries.
_SCORE_ELEMENTS = 1 << 24
# States scored together against all keys in sequence_negatives_of.
_SCORE_BLOCK = 4096


@dataclass
class CalibrationReport:
    """What :func:`calibrate` measured and changed. Openings are positions (of the calibration text) whose best row
    passes its gate; ``own_*`` counts rows whose bare prompt retrieves the row itself."""

    rows: int
    fitted: int
    raised: int
    conflicts: int
    gamma: float
    delta: float
    margin: float
    text_positions: int
    text_open_before: int
    text_open_after: int
    own_before: int
    own_after: int
    thresholds: torch.Tensor  # the database's thresholds after calibration, row order
    positives: torch.Tensor  # p_j per row (-1 where the row has no Fact)
    negatives: torch.Tensor  # n_j per row (-1 where no negative passed gamma)

    def summary(self) -> str:
        pct = lambda a, b: f"{100 * a / b:.2f}%" if b else "n/a"
        return (
            f"{self.raised} of {self.fitted} rows got a threshold above gamma {self.gamma:g} "
            f"(delta {self.delta:g}, margin {self.margin:g}; {self.conflicts} could not be separated from their "
            f"negatives); calibration text: {self.text_positions} positions, open before "
            f"{pct(self.text_open_before, self.text_positions)}, after {pct(self.text_open_after, self.text_positions)}; "
            f"own prompts retrieving their row: {self.own_before} -> {self.own_after} of {self.fitted}"
        )


def read_corpus(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file (gzip allowed, see :func:`neuraldb.text_files.read_text`); ValueError when it holds
    no text."""
    text = read_text(path)
    if not text.strip():
        raise ValueError(f"text: {os.fspath(path)!r} holds no text")
    return text


def text_states(model: torch.nn.Module, tokenizer, layer: int, texts: Sequence[str], **options: int) -> torch.Tensor:
    """:func:`text_windows` joined: fp32 ``(positions, d1)``."""
    return torch.cat(text_windows(model, tokenizer, layer, texts, **options))


def text_windows(
    model: torch.nn.Module,
    tokenizer,
    layer: int,
    texts: Sequence[str],
    *,
    tokens: int = DEFAULT_TOKENS,
    skip: int = 0,
    window: int = DEFAULT_WINDOW,
) -> list[torch.Tensor]:
    """Unit down-projection inputs of ``layer`` over ``tokens`` tokens of ``texts`` (joined by newlines, tokenised
    raw) after the first ``skip``, one fp32 ``(positions, d1)`` tensor per window of ``window`` tokens, as perplexity
    is scored; each window's first token (context only, and an attention-sink outlier) is left out."""
    from neuraldb.editing import model_access

    if isinstance(texts, str) or not texts or not any(t.strip() for t in texts):
        raise ValueError("texts: the calibration corpus must be a non-empty list of strings with some text")
    ids = list(tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"])[skip : skip + tokens]
    if len(ids) < 2:
        raise ValueError(f"texts: fewer than 2 tokens left after skip={skip} ({len(ids)})")
    h = model_access.handles(model, layer)
    pad = templates.pad_id(tokenizer)
    out = []
    with torch.inference_mode():
        for start in range(0, len(ids), window):
            part = ids[start : start + window]
            if len(part) < 2:
                continue
            states, _ = model_access.down_proj_inputs(h, [part], pad)
            out.append(torch.nn.functional.normalize(states[0, 1:].cpu(), dim=-1))
    return out


def best_rows(states: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score, row)`` of the best unit key for each unit state row (fp32), in chunks."""
    if keys.shape[0] == 0 or states.shape[0] == 0:
        return torch.full((states.shape[0],), float("-inf")), torch.full((states.shape[0],), -1, dtype=torch.long)
    step = max(1, _SCORE_ELEMENTS // keys.shape[0])
    parts = [(states[s : s + step] @ keys.T).max(dim=1) for s in range(0, states.shape[0], step)]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def opens(score: torch.Tensor, row: torch.Tensor, gamma: float, thresholds: torch.Tensor) -> torch.Tensor:
    """Where the best row's gate opens: ``score > gamma`` and ``score > thresholds[row]``."""
    if thresholds.numel() == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    return (score > gamma) & (score > thresholds[row.clamp_min(0)])


def sequence_negatives_of(
    model: torch.nn.Module,
    tokenizer,
    layer: int,
    template: str | None,
    facts: Sequence[Fact],
    rows: Sequence[int],
    keys: torch.Tensor,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score, row)`` of the best key at every position of each fact's own sequence (template + prompt + target
    tokens but the last, as a fact is scored teacher-forced) except its first token and its subject's last token,
    keeping only positions whose best row is not the fact's own (``rows[i]`` is ``facts[i]``'s row of ``keys``).

    Other facts' prompts are otherwise scored only at their subject's last token, but a question-style row also
    opens at later positions of other questions: a key read where the subject's last token is merged with the "?"
    after it (SmolLM2 tokenises "(The Flooded Station)?" as ..., " Station", ")?") is the state at the end of a
    question and resembles the end of any question. In a 1,000-fact zsRE database another row opened at the "?" of
    120 of 200 evaluated questions (docs/gate.md, "Question-style facts")."""
    from neuraldb.editing import model_access
    from neuraldb.editing.contexts import _subject_last

    h = model_access.handles(model, layer)
    pad = templates.pad_id(tokenizer)
    seqs, subj = [], []
    for f in facts:
        pre, _, _ = f.prompt.partition("{}")
        ids, s = _subject_last(tokenizer, template, f.text, len(pre) + len(f.subject))
        seqs.append(ids + templates.encode_target(tokenizer, f.target_new)[:-1])
        subj.append(s)
    # States are scored in blocks of several sequences: each best_rows call reads every key once, so scoring
    # sequence by sequence made the whole pass memory-bound on the keys (most of its time at 20k rows).
    scores, best, pending, owners = [], [], [], []

    def flush() -> None:
        sc, r = best_rows(torch.cat(pending), keys)
        other = r != torch.cat(owners)
        scores.append(sc[other])
        best.append(r[other])
        pending.clear()
        owners.clear()

    with torch.inference_mode():
        for start in range(0, len(seqs), batch_size):
            part = seqs[start : start + batch_size]
            states, _mask = model_access.down_proj_inputs(h, part, pad)
            for b, ids in enumerate(part):
                i = start + b
                keep = torch.ones(len(ids), dtype=torch.bool)
                keep[0] = False
                keep[subj[i]] = False
                pending.append(torch.nn.functional.normalize(states[b, : len(ids)][keep].cpu(), dim=-1))
                owners.append(torch.full((int(keep.sum()),), rows[i], dtype=torch.long))
            if sum(p.shape[0] for p in pending) >= _SCORE_BLOCK:
                flush()
        if pending:
            flush()
    if not scores:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(scores), torch.cat(best)


def calibrate(
    model: torch.nn.Module,
    tokenizer,
    db: NeuralKVDatabase,
    texts: Sequence[str] | None,
    *,
    tokens: int = DEFAULT_TOKENS,
    skip: int = 0,
    delta: float = 0.05,
    margin: float = 0.1,
    word_negatives: bool = True,
    sequence_negatives: bool = True,
    dry_run: bool = False,
    progress: Callable[[str], None] | None = None,
) -> CalibrationReport:
    """Fit every Fact row's gate threshold (see the module docstring) and, unless ``dry_run``, set them in ``db``.

    Args:
        model, tokenizer: the model the database was edited into (its layer ``db.layer``).
        db: the database; its rows' facts give the positives, ``db.gamma`` (or 0.65) the gate.
        texts: the calibration corpus (ordinary text); ``tokens`` of it after the first ``skip`` are read. None:
            no text, only the database's own negatives (what ``neuraldb edit`` fits by default).
        delta: how far above its hardest negative a row's threshold goes.
        margin: how far below its own prompt's cosine a threshold may go at most.
        word_negatives: also use the subject's last word alone as a negative (subjects of several words).
        sequence_negatives: also use every position of every fact's own prompt + target but its subject's last
            token, scored for the best row there when that is another row (see :func:`sequence_negatives`).
        progress: called with a line per stage.

    Returns a :class:`CalibrationReport`. ValueError for a database without a layer, an empty corpus, or delta/
    margin outside [0, 1]; nothing changes in ``db`` on error.
    """
    from neuraldb.editing import compute_keys, model_access

    for name, value in (("delta", delta), ("margin", margin)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    layer = recorded_layer(db)
    gamma = 0.65 if db.gamma is None else db.gamma
    say = progress or (lambda line: None)
    with db.lock:
        keys = torch.nn.functional.normalize(db.keys.float().cpu(), dim=-1)
        ids = db.ids()
        facts = [(r, db.fact(i)) for r, i in enumerate(ids)]
    m = keys.shape[0]
    rows = [r for r, f in facts if isinstance(f, Fact)]
    own_facts = [f for _, f in facts if isinstance(f, Fact)]

    if texts is None:
        text = torch.empty(0, keys.shape[1])
    else:
        say(f"reading the states of {tokens} tokens of calibration text")
        text = text_states(model, tokenizer, layer, texts, tokens=tokens, skip=skip)
    t_score, t_row = best_rows(text, keys)
    neg = torch.full((m,), -1.0)
    hit = t_score > gamma
    neg.scatter_reduce_(0, t_row[hit], t_score[hit], "amax")

    pos = torch.full((m,), -1.0)
    o_score = o_row = torch.empty(0)
    if rows:
        say(f"reading the states of {len(rows)} facts' own prompts")
        own = torch.nn.functional.normalize(
            compute_keys(model, tokenizer, own_facts, layer, n_prefixes=0, template=db.template).float(), dim=-1
        )
        row_t = torch.tensor(rows)
        pos[row_t] = (own * keys[row_t]).sum(-1)
        o_score, o_row = best_rows(own, keys)
        other = (o_row != row_t) & (o_score > gamma)
        neg.scatter_reduce_(0, o_row[other], o_score[other], "amax")
        if sequence_negatives:
            say(f"reading the states of {len(rows)} facts' prompts and targets")
            s_score, s_row = sequence_negatives_of(model, tokenizer, layer, db.template, own_facts, rows, keys)
            hit = s_score > gamma
            neg.scatter_reduce_(0, s_row[hit], s_score[hit], "amax")
        if word_negatives:
            words, owner = [], []
            for r, f in zip(rows, own_facts):
                parts = f.subject.split()
                if len(parts) > 1:
                    for fw in FUNCTION_WORDS:
                        words.append(f"{fw} {parts[-1]}")
                        owner.append(r)
            if words:
                say(f"reading the states of {len(words)} last-word negatives")
                # The word ends each text, so its last token is where a key of that subject would be read.
                w = model_access.last_token_states(model, tokenizer, words, layer, db.template)
                owner_t = torch.tensor(owner)
                neg.scatter_reduce_(0, owner_t, (w * keys[owner_t]).sum(-1), "amax")

    fitted = torch.zeros(m, dtype=torch.bool)
    if rows:
        fitted[torch.tensor(rows)] = True
    want = torch.minimum(neg + delta, pos - margin)
    raise_ = fitted & (neg > -1) & (want > gamma)
    conflicts = int((raise_ & (neg + delta > pos - margin)).sum())
    with db.lock:
        if db.ids() != ids:
            raise DatabaseChangedError("db changed while it was being calibrated; calibrate again")
        new = db.thresholds
        new[fitted] = -1.0
        new[raise_] = want[raise_].clamp(max=1.0)
        if not dry_run and rows:
            db.set_thresholds([ids[r] for r in rows], new[torch.tensor(rows)])
    before = torch.full((m,), -1.0)
    own_before = own_after = 0
    if rows:
        mine = o_row == torch.tensor(rows)
        own_before = int((mine & opens(o_score, o_row, gamma, before)).sum())
        own_after = int((mine & opens(o_score, o_row, gamma, new)).sum())
    return CalibrationReport(
        rows=m,
        fitted=len(rows),
        raised=int(raise_.sum()),
        conflicts=conflicts,
        gamma=gamma,
        delta=float(delta),
        margin=float(margin),
        text_positions=text.shape[0],
        text_open_before=int(opens(t_score, t_row, gamma, before).sum()),
        text_open_after=int(opens(t_score, t_row, gamma, new).sum()),
        own_before=own_before,
        own_after=own_after,
        thresholds=new,
        positives=pos,
        negatives=neg,
    )


def enable_relation_gate(
    model: torch.nn.Module,
    tokenizer,
    db: NeuralKVDatabase,
    *,
    rho: float = 0.4,
    window: int = 24,
) -> int:
    """Give every Fact row of ``db`` its relation key (its bare prompt's last-token state, see
    :mod:`neuraldb.relation_gate`) and turn the relation gate on with ``rho`` and ``window``; returns the number of
    rows given one. ValueError for a database without a layer or a bad ``rho``/``window`` (nothing changes).

    Example::

        >>> enable_relation_gate(model, tok, db, rho=0.4)     # doctest: +SKIP
        1000
    """
    from neuraldb.editing import model_access
    from neuraldb.relation_gate import check_relation_gate

    gate = check_relation_gate({"rho": rho, "window": window})
    layer = recorded_layer(db)
    with db.lock:
        ids = db.ids()
        pairs = [(i, db.fact(i)) for i in ids]
    chosen = [(i, f) for i, f in pairs if isinstance(f, Fact)]
    if chosen:
        # The relation key: the state at the last token of the fact's bare prompt. (Read at the last word before a
        # question's "?" instead, 100 KnowEdit facts kept 88% of other-relation questions unchanged instead of 60%,
        # but 88% of other-relation statements instead of 99.96%, and generalization fell from 62.7 to 44.3.)
        keys = model_access.last_token_states(model, tokenizer, [f.text for _, f in chosen], layer, db.template, 32)
        with db.lock:
            if db.ids() != ids:
                raise DatabaseChangedError("db changed while its relation keys were computed; run again")
            db.update([i for i, _ in chosen], relation_keys=keys)
    db.relation_gate = gate
    return len(chosen)


def text_openings(
    model: torch.nn.Module,
    tokenizer,
    db: NeuralKVDatabase,
    texts: Sequence[str],
    *,
    tokens: int = DEFAULT_TOKENS,
    skip: int = 0,
    rows: int | None = None,
) -> dict:
    """How often ordinary text opens a gate: ``{"positions", "open", "open_pct", "open_without_thresholds_pct"}``
    over ``tokens`` tokens of ``texts`` after ``skip`` (as :func:`text_states` reads them), for the first ``rows``
    rows of ``db`` (default: all) with and without their thresholds; "open" also passes ``db.relation_gate`` when
    it is on (a window's first scored position counts its unscored previous token as seen)."""
    windows = text_windows(model, tokenizer, recorded_layer(db), texts, tokens=tokens, skip=skip)
    text = torch.cat(windows)
    gamma = 0.65 if db.gamma is None else db.gamma
    with db.lock:
        keys = torch.nn.functional.normalize(db.keys[:rows].float().cpu(), dim=-1)
        thresholds = db.thresholds[:rows].cpu()
        gate, gate_keys = db.relation_gate, db.relation_keys
    score, row = best_rows(text, keys)
    n = text.shape[0]
    opened = opens(score, row, gamma, thresholds)
    if gate is not None and gate_keys is not None:
        from neuraldb.relation_gate import confirm

        parts = []
        for q, o, r in zip(
            windows, opened.split([w.shape[0] for w in windows]), row.split([w.shape[0] for w in windows])
        ):
            out = confirm(q, o.float()[:, None], torch.where(o, r, -1), gate_keys[:rows].float().cpu(), **gate)
            parts.append(out[:, 0] != 0)
        opened = torch.cat(parts)
    with_t = int(opened.sum())
    without = int(opens(score, row, gamma, torch.full_like(thresholds, -1.0)).sum())
    return {
        "positions": n,
        "rows": keys.shape[0],
        "open": with_t,
        "open_pct": round(100 * with_t / n, 3),
        "open_without_thresholds_pct": round(100 * without / n, 3),
    }


__all__ = [
    "CalibrationReport",
    "DatabaseChangedError",
    "best_rows",
    "calibrate",
    "enable_relation_gate",
    "opens",
    "read_corpus",
    "sequence_negatives_of",
    "text_openings",
    "text_states",
]
