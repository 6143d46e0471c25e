"""Facts to edit: ``Fact`` and loaders for JSONL, CounterFact (ROME and MEND formats) and ZsRE (MEND format).

Over 400 lines because every format's reader sits beside the one format detector that chooses between them and the
one error type that names a bad file's line; each reader is short.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from neuraldb.atomic import atomic_path
from neuraldb.text_files import TextFileError, read_text


@dataclass(frozen=True)
class Fact:
    """One edit: ``prompt`` with "{}" where ``subject`` goes, completed by ``target_new``.

    ``target_true`` is the object the unedited model is expected to give; ``paraphrases`` and ``neighborhood``
    are evaluation prompts (full text, subject already filled in) for generalisation and specificity.

    Example::

        >>> f = Fact("Danielle Darrieux", "The mother tongue of {} is", "English", target_true="French")
        >>> f.text
        'The mother tongue of Danielle Darrieux is'
    """

    subject: str
    prompt: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[str, ...] = ()
    extras: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("subject", "prompt", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"Fact.{name} must be a non-empty string, got {value!r}")
        if self.prompt.count("{}") != 1:
            raise ValueError(f"Fact.prompt must contain exactly one '{{}}' marking the subject, got {self.prompt!r}")
        object.__setattr__(self, "paraphrases", tuple(self.paraphrases))
        object.__setattr__(self, "neighborhood", tuple(self.neighborhood))

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)


# ---------------------------------------------------------------------------------------------------------------------
# Loaders
#
# ``load(path)`` reads a file of records (a JSON array or JSON lines, gzip or not), recognises the schema from the
# records themselves and returns ``Fact`` objects. Every fact's ``extras`` holds:
#
#   "format"                 the detected format name (one of FORMATS)
#   "neighborhood_answers"   tuple, one expected answer per ``neighborhood`` prompt (the unedited answer that a
#                            specificity metric checks is kept): CounterFact ROME format -> target_true for all ten
#                            prompts; CounterFact MEND -> locality_ground_truth; ZsRE MEND -> loc_ans;
#                            KnowEdit ZsRE -> each locality entry's first ground_truth. Absent when there is no
#                            neighbourhood.
#
# and, depending on the format, the source's own fields (see each parser): "case_id", "pararel_idx", "relation_id",
# "target_new_id", "target_true_id", "attribute_prompts", "generation_prompts", "portability",
# "alternative_subject", "locality_ground_truth", "answers", "pred", "loc_ans", "cond", "locality" (KnowEdit's dict,
# kept as given: its Relation_Specificity prompts are also the neighborhood; evaluation.zsre reads both dicts).
# ---------------------------------------------------------------------------------------------------------------------

FORMATS = ("neuraldb", "counterfact-rome", "counterfact-mend", "zsre-mend", "zsre-knowedit")

__all__ = ["FORMATS", "Fact", "FactFormatError", "detect_format", "load", "parse", "save", "to_record"]


class FactFormatError(ValueError):
    """A file or record whose schema is not one of ``FORMATS`` (or is broken)."""


class _Unusable(ValueError):
    """A record in a known schema that cannot be an edit (subject not in its prompt, an empty target, ...)."""


def _read_text(path: Path) -> str:
    try:
        return read_text(path)
    except TextFileError as e:
        suffix = "; facts files must be UTF-8 (JSON's encoding)" if "not UTF-8" in str(e) else ""
        raise FactFormatError(f"{e}{suffix}") from None


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except RecursionError:  # json's C decoder recurses once per nesting level
        raise FactFormatError(f"{where}: JSON nested too deeply to be a fact record") from None
    except json.JSONDecodeError:
        raise
    except ValueError as e:  # an integer beyond Python's int-from-string digit limit
        raise FactFormatError(f"{where}: {e}") from None


def _iter_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Yields (where, record) from a JSON array, a single JSON object or JSON lines (gzip transparently)."""
    text = _read_text(path)
    body = text.lstrip()
    if not body:
        return
    if body[0] == "[":
        try:
            records = _json(body, str(path))
        except json.JSONDecodeError as e:
            raise FactFormatError(f"{path}: not valid JSON ({e})") from None
        for i, rec in enumerate(records):
            yield f"{path}: record {i}", rec
        return
    # JSON lines (a file holding one pretty-printed object is also accepted); line numbers count from the file's top.
    # Split at "\n" only: str.splitlines also splits at U+2028 and others, which JSON strings may hold unescaped.
    parsed = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            parsed.append((n, _json(line, f"{path}: line {n}")))
        except json.JSONDecodeError as e:
            try:
                parsed = [(0, _json(body, str(path)))]
                break
            except json.JSONDecodeError:
                raise FactFormatError(
                    f"{path}: line {n}: invalid JSON ({e}); expected a JSON array or one JSON object per line"
                ) from None
    for n, rec in parsed:
        yield (f"{path}: line {n}" if n else f"{path}: record 0"), rec


def _place_subject(text: str, subject: str) -> tuple[str, str]:
    """Returns (prompt with "{}" at the subject's first occurrence, subject as written in ``text``).

    An exact match is preferred; failing that, a case-insensitive one (the subject then takes the text's spelling,
    since the key is read at the subject's tokens as they appear in the prompt). Raises _Unusable otherwise.
    """
    i = text.find(subject)
    if i < 0:
        i = text.lower().find(subject.lower())
        if i < 0 or not subject.strip():
            raise _Unusable(f"subject {subject!r} does not occur in {text!r}")
        subject = text[i : i + len(subject)]
    return text[:i] + "{}" + text[i + len(subject) :], subject


def _str(rec: dict, key: str, where: str) -> str:
    if key not in rec:
        raise KeyError(key)
    value = rec[key]
    if not isinstance(value, str):
        raise TypeError(f"field {key!r} must be a string, got {value!r}")
    return value


def _first(value):
    while isinstance(value, (list, tuple)):
        if not value:
            return None
        value = value[0]
    return value


def _parse_neuraldb(rec: dict, where: str) -> Fact:
    subject = _str(rec, "subject", where)
    prompt = _str(rec, "prompt", where)
    if "{}" not in prompt:
        prompt, subject = _place_subject(prompt, subject)
    extras = dict(rec.get("extras") or {})
    return Fact(
        subject,
        prompt,
        _str(rec, "target_new", where),
        target_true=rec.get("target_true"),
        paraphrases=tuple(rec.get("paraphrases") or ()),
        neighborhood=tuple(rec.get("neighborhood") or ()),
        extras=extras,
    )


def _parse_counterfact_rome(rec: dict, where: str) -> Fact:
    rw = rec["requested_rewrite"]
    if not isinstance(rw, dict):
        raise FactFormatError(
            f"{where}: 'requested_rewrite' is a {type(rw).__name__}, not a dict "
            "(a list of rewrites is MQuAKE's multi-hop format, which is not supported)"
        )
    target_new, target_true = rw["target_new"], rw.get("target_true")
    neighborhood = tuple(rec.get("neighborhood_prompts") or ())
    t_true = target_true["str"] if isinstance(target_true, dict) else target_true
    extras: dict[str, Any] = {"format": "counterfact-rome"}
    for key in ("case_id", "pararel_idx"):
        if key in rec:
            extras[key] = rec[key]
    if "relation_id" in rw:
        extras["relation_id"] = rw["relation_id"]
    if isinstance(target_new, dict) and "id" in target_new:
        extras["target_new_id"] = target_new["id"]
    if isinstance(target_true, dict) and "id" in target_true:
        extras["target_true_id"] = target_true["id"]
    for key in ("attribute_prompts", "generation_prompts"):
        if key in rec:
            extras[key] = tuple(rec[key])
    for key in ("portability", "alternative_subject"):
        if key in rec:
            extras[key] = rec[key]
    if neighborhood and t_true is not None:
        extras["neighborhood_answers"] = (t_true,) * len(neighborhood)
    prompt, subject = rw["prompt"], rw["subject"]
    if "{}" not in prompt:
        prompt, subject = _place_subject(prompt, subject)
    return Fact(
        subject,
        prompt,
        target_new["str"] if isinstance(target_new, dict) else target_new,
        target_true=t_true,
        paraphrases=tuple(rec.get("paraphrase_prompts") or ()),
        neighborhood=neighborhood,
        extras=extras,
    )


def _parse_counterfact_mend(rec: dict, where: str) -> Fact:
    prompt, subject = _place_subject(_str(rec, "prompt", where), _str(rec, "subject", where))
    extras: dict[str, Any] = {"format": "counterfact-mend"}
    if "case_id" in rec:
        extras["case_id"] = rec["case_id"]
    neighborhood: tuple[str, ...] = ()
    if rec.get("locality_prompt"):
        neighborhood = (rec["locality_prompt"],)
        if rec.get("locality_ground_truth") is not None:
            extras["locality_ground_truth"] = rec["locality_ground_truth"]
            extras["neighborhood_answers"] = (rec["locality_ground_truth"],)
    return Fact(
        subject,
        prompt,
        _str(rec, "target_new", where),
        target_true=_first(rec.get("ground_truth")),
        paraphrases=(rec["rephrase_prompt"],) if rec.get("rephrase_prompt") else (),
        neighborhood=neighborhood,
        extras=extras,
    )


def _parse_zsre_mend(rec: dict, where: str) -> Fact:
    prompt, subject = _place_subject(_str(rec, "src", where), _str(rec, "subject", where))
    answers = rec.get("answers") or []
    if isinstance(answers, str):
        answers = [answers]
    extras: dict[str, Any] = {"format": "zsre-mend", "answers": tuple(answers)}
    for key in ("case_id", "pred", "cond", "portability"):
        if key in rec:
            extras[key] = rec[key]
    neighborhood: tuple[str, ...] = ()
    if rec.get("loc"):
        neighborhood = (rec["loc"],)
        if rec.get("loc_ans") is not None:
            extras["loc_ans"] = rec["loc_ans"]
            extras["neighborhood_answers"] = (rec["loc_ans"],)
    return Fact(
        subject,
        prompt,
        _str(rec, "alt", where),
        target_true=answers[0] if answers else None,
        paraphrases=(rec["rephrase"],) if rec.get("rephrase") else (),
        neighborhood=neighborhood,
        extras=extras,
    )


def _parse_zsre_knowedit(rec: dict, where: str) -> Fact:
    prompt, subject = _place_subject(_str(rec, "prompt", where), _str(rec, "subject", where))
    extras: dict[str, Any] = {"format": "zsre-knowedit"}
    for key in ("case_id", "cond", "portability", "locality"):
        if key in rec:
            extras[key] = rec[key]
    neighborhood, answers = [], []
    for entries in (rec.get("locality") or {}).values():
        for entry in entries or ():
            if isinstance(entry, dict) and entry.get("prompt"):
                neighborhood.append(entry["prompt"])
                answers.append(_first(entry.get("ground_truth")))
    if neighborhood:
        extras["neighborhood_answers"] = tuple(answers)
    rephrase = rec.get("rephrase_prompt")
    if isinstance(rephrase, str):
        rephrase = [rephrase]
    return Fact(
        subject,
        prompt,
        _str(rec, "target_new", where),
        target_true=_first(rec.get("ground_truth")),
        paraphrases=tuple(p for p in (rephrase or ()) if p),
        neighborhood=tuple(neighborhood),
        extras=extras,
    )


_PARSERS: dict[str, Callable[[dict, str], Fact]] = {
    "neuraldb": _parse_neuraldb,
    "counterfact-rome": _parse_counterfact_rome,
    "counterfact-mend": _parse_counterfact_mend,
    "zsre-mend": _parse_zsre_mend,
    "zsre-knowedit": _parse_zsre_knowedit,
}


def detect_format(record: Any) -> str:
    """The name (in ``FORMATS``) of the schema ``record`` follows; raises FactFormatError for anything else."""
    if not isinstance(record, dict):
        raise FactFormatError(f"a fact record must be a JSON object, got {type(record).__name__}")
    keys = set(record)
    if "requested_rewrite" in keys:
        if isinstance(record["requested_rewrite"], list):
            raise FactFormatError(
                "this looks like MQuAKE (a list of requested rewrites per case), which is not supported; "
                "supported formats: " + ", ".join(FORMATS)
            )
        return "counterfact-rome"
    if {"src", "alt", "subject"} <= keys:
        return "zsre-mend"
    if {"prompt", "subject", "target_new"} <= keys:
        if isinstance(record.get("locality"), dict) or isinstance(record.get("ground_truth"), list):
            return "zsre-knowedit"
        if "{}" in str(record["prompt"]) or not keys & {"ground_truth", "rephrase_prompt", "locality_prompt"}:
            return "neuraldb"
        return "counterfact-mend"
    hint = ""
    if {"known_id", "template", "attribute"} <= keys:
        hint = " (this looks like ROME's known_1000.json: known facts without a new target, not edits)"
    raise FactFormatError(
        f"unrecognised fact record with keys {sorted(keys)}{hint}. Supported formats: "
        "neuraldb {subject, prompt, target_new, ...}; CounterFact ROME {requested_rewrite, ...}; "
        "CounterFact MEND {prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt}; "
        "ZsRE MEND {subject, src, alt, answers, rephrase, loc, loc_ans}; "
        "KnowEdit ZsRE {subject, prompt, target_new, ground_truth: [...], locality: {...}}"
    )


OnInvalid = Literal["warn", "skip", "error"]


def parse(
    records: Iterable[Any],
    *,
    limit: int | None = None,
    format: str | None = None,
    on_invalid: OnInvalid = "warn",
    source: str = "record",
) -> list[Fact]:
    """Turns already-parsed records into facts (see ``load``); ``records`` may also yield (where, record) pairs.

    Example::

        >>> [f.text for f in parse([{"subject": "Rome", "prompt": "{} is the capital of", "target_new": "France"}])]
        ['Rome is the capital of']
    """
    if format is not None and format not in _PARSERS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if on_invalid not in ("warn", "skip", "error"):
        raise ValueError(f"on_invalid must be 'warn', 'skip' or 'error', got {on_invalid!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    facts: list[Fact] = []
    skipped: list[str] = []
    if limit == 0:
        return facts
    for i, item in enumerate(records):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            where, rec = item
        else:
            where, rec = f"{source} {i}", item
        if format is None:
            try:
                format = detect_format(rec)
            except FactFormatError as e:
                raise FactFormatError(f"{where}: {e}") from None
        elif not isinstance(rec, dict):
            raise FactFormatError(f"{where}: a fact record must be a JSON object, got {type(rec).__name__}")
        try:
            fact = _PARSERS[format](rec, where)
        except FactFormatError:
            raise
        except (_Unusable, ValueError) as e:  # Fact's own checks (an empty target, ...) raise ValueError
            if on_invalid == "error":
                raise FactFormatError(f"{where}: cannot be an edit: {e}") from None
            skipped.append(f"{where}: {e}")
            continue
        except (KeyError, TypeError, AttributeError) as e:  # AttributeError: a list where a parser wants a dict
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise FactFormatError(f"{where}: not a valid {format} record: {what}") from None
        if "format" not in fact.extras:
            fact.extras["format"] = format
        facts.append(fact)
        if limit is not None and len(facts) >= limit:
            break
    if skipped and on_invalid == "warn":
        shown = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        warnings.warn(
            f"skipped {len(skipped)} record(s) that cannot be edits: {shown}",
            stacklevel=3,
        )
    return facts


def load(
    path: str | os.PathLike,
    *,
    limit: int | None = None,
    format: str | None = None,
    on_invalid: OnInvalid = "warn",
) -> list[Fact]:
    """Reads facts from ``path``: a JSON array or JSON lines file, gzip-compressed or not.

    The format is detected from the first record (or forced with ``format=``, one of ``FORMATS``):

    - ``neuraldb``: ``{"subject", "prompt" (with "{}"), "target_new", "target_true"?, "paraphrases"?,
      "neighborhood"?, "extras"?}``, as ``save`` writes;
    - ``counterfact-rome``: ROME's CounterFact (``requested_rewrite``, ``paraphrase_prompts``,
      ``neighborhood_prompts``; ``case_id``, ``attribute_prompts``, ``generation_prompts`` go into extras);
    - ``counterfact-mend``: MEND/EasyEdit CounterFact splits (``prompt`` holds the subject, which becomes "{}";
      ``rephrase_prompt`` -> paraphrases, ``locality_prompt`` -> neighborhood);
    - ``zsre-mend``: MEND/ROME zsRE (``src`` -> prompt, ``alt`` -> target_new, ``answers[0]`` -> target_true,
      ``rephrase`` -> paraphrases, ``loc`` -> neighborhood with answer ``loc_ans``);
    - ``zsre-knowedit``: KnowEdit's ZsRE (``locality`` dict -> neighborhood; it and ``portability`` are also kept
      as given in extras).

    Where the subject must be found in a prompt (MEND, ZsRE and KnowEdit formats), an exact match is used, else a
    case-insensitive one. Records that follow the schema but cannot be edits (the subject does not occur in the
    prompt, an empty target: two such records are in zsRE's train split) are skipped with one summary warning
    (``on_invalid="warn"``), skipped silently (``"skip"``) or raise ``FactFormatError`` (``"error"``). Records
    that break the schema (a missing field, a wrong type) always raise ``FactFormatError``, as does a file that is
    not UTF-8, not valid JSON (or nested too deeply) or a corrupt gzip file; the message names the file and, where
    it can, the line. A missing path raises ``FileNotFoundError``, a directory ``IsADirectoryError``.
    ``limit`` caps the number of facts returned. The "Loaders" comment in this module's source lists the keys put
    in ``Fact.extras`` (``"neighborhood_answers"`` holds the expected answer for each neighborhood prompt).

    Example::

        >>> facts = neuraldb.facts.load("counterfact_rome_format_1031.json.gz", limit=100)  # doctest: +SKIP
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a facts file")
    if not path.is_file():
        raise FileNotFoundError(f"facts file not found: {path}")
    return parse(_iter_records(path), limit=limit, format=format, on_invalid=on_invalid)


def to_record(fact: Fact) -> dict:
    """The ``neuraldb``-format JSON record of ``fact`` (what ``save`` writes and ``load`` reads back)."""
    rec: dict[str, Any] = {"subject": fact.subject, "prompt": fact.prompt, "target_new": fact.target_new}
    if fact.target_true is not None:
        rec["target_true"] = fact.target_true
    if fact.paraphrases:
        rec["paraphrases"] = list(fact.paraphrases)
    if fact.neighborhood:
        rec["neighborhood"] = list(fact.neighborhood)
    if fact.extras:
        rec["extras"] = fact.extras
    return rec


def save(facts: Iterable[Fact], path: str | os.PathLike) -> None:
    """Writes ``facts`` as JSON lines in the ``neuraldb`` format (gzip-compressed when ``path`` ends in .gz)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with atomic_path(path) as tmp, opener(tmp, "wt", encoding="utf-8") as f:
        for fact in facts:
            f.write(json.dumps(to_record(fact), ensure_ascii=False) + "\n")
