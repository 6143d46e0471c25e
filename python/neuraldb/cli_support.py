"""What the ``neuraldb`` commands share: the one-line error type, argument parsers, model loading and generation
with progress, database and output-path checks. ``neuraldb.cli`` builds the commands on it; ``neuraldb.cli_demo``,
``neuraldb.cli_edit`` and ``neuraldb.evaluation.command`` use it without importing the CLI itself.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from neuraldb.database import NeuralKVDatabase
    from neuraldb.database_inputs import FactLike


class CLIError(Exception):
    """An error to report on one line, without a traceback."""


# ---------------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------------


def parse_id_ranges(values: Sequence[str]) -> list[range]:
    """Fact ids from command-line words as ranges, never expanded (``0-1000000000`` costs nothing).

    Example::

        >>> parse_id_ranges(["3", "5-7", "9,10"])
        [range(3, 4), range(5, 8), range(9, 10), range(10, 11)]
    """
    out: list[range] = []
    for word in values:
        for part in word.split(","):
            part = part.strip()
            if not part:
                continue
            lo, sep, hi = part.partition("-")  # "-" is the separator, so no id can be negative
            try:
                a = int(lo)
                b = int(hi) if sep else a
                if b < a:
                    raise ValueError
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"invalid id {part!r}: use non-negative integers or ranges like 5-7"
                ) from None
            out.append(range(a, b + 1))
    if not out:
        raise argparse.ArgumentTypeError("no ids given")
    return out


def parse_ids(values: Sequence[str]) -> list[int]:
    """Fact ids from command-line words: ``["3", "5-7", "9,10"]`` -> ``[3, 5, 6, 7, 9, 10]``."""
    return [i for r in parse_id_ranges(values) for i in r]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _slice(text: str) -> tuple[int, int | None]:
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        a, b = int(start or 0), (int(stop) if stop else None)
        if a < 0 or (b is not None and b <= a):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid slice {text!r}: use START:STOP with 0 <= START < STOP (STOP may be left out: START:)"
        ) from None
    return a, b


def _gamma(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [-1, 1], got {text!r}") from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"gamma must be in [-1, 1], got {value}")
    return value


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine")
    return text


def _utf8_text(text: str) -> str:
    # Arguments that are not UTF-8 arrive with lone surrogates (Python's surrogateescape), which tokenizers reject
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            f"not valid UTF-8 text: {text.encode('utf-8', 'backslashreplace').decode('ascii', 'replace')}"
        ) from None
    return text


# ---------------------------------------------------------------------------------------------------------------------
# Helpers shared with the demo
# ---------------------------------------------------------------------------------------------------------------------


def load_model_verbose(
    name: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    out: TextIO | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """:func:`neuraldb.load_model`, saying on ``out`` (default: the current ``sys.stderr``) what it loads and how
    long that took."""
    from neuraldb.models import load_model

    out = sys.stderr if out is None else out  # not a default argument: that would be the stderr of import time

    t0 = time.perf_counter()
    print(f"Loading model {name!r} ...", file=out, flush=True)
    model, tok = load_model(name, dtype, device=device)
    print(f"Loaded in {time.perf_counter() - t0:.1f} s", file=out, flush=True)
    return model, tok


# How generate_text's answer without text begins, so that it never prints as an empty line
NO_TEXT = "(no text: the model generated "


def generate_text(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompt: str,
    *,
    template: str | None,
    max_new_tokens: int,
    chat: bool = False,
) -> str:
    """Greedy continuation of ``prompt`` (wrapped in ``template``, or with ``chat`` asked as a user turn of the
    tokenizer's chat template, see :func:`neuraldb.templates.encode_chat`), without the prompt.

    An answer of special tokens only (SmolLM2-Instruct ends its turn at once after a question in plain text) is
    :data:`NO_TEXT` and what was generated, e.g. ``(no text: the model generated '<|im_end|>')``: decoded without
    them it would be an empty string.
    """
    import torch

    from neuraldb import templates

    ids = templates.encode_chat(tok, prompt) if chat else templates.encode(tok, template, prompt)
    ids = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    new = out[0, ids.shape[1] :]
    text = tok.decode(new, skip_special_tokens=True)
    return text if text.strip() else f"{NO_TEXT}{tok.decode(new, skip_special_tokens=False)!r})"


def one_line(text: str, width: int | None = None) -> str:
    """``text`` with its whitespace runs collapsed to single spaces, cut to ``width`` characters with an ellipsis.

    Example::

        >>> one_line("Rome   is  the capital", width=12)
        'Rome is the…'
    """
    text = " ".join(text.split())
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def load_db(path: Path) -> NeuralKVDatabase:
    """``NeuralKVDatabase.load(path)``, failing with a one-line CLIError when the file is missing or invalid."""
    from neuraldb.database import NeuralKVDatabase

    if not path.exists():
        raise CLIError(f"database not found: {path}")
    try:
        return NeuralKVDatabase.load(path)
    except (OSError, ValueError, TypeError) as e:
        raise CLIError(f"cannot read database {path}: {e}") from None


def check_output(path: Path, *, replace: bool, exists_hint: str = "") -> None:
    """Fail with a CLIError, before any work, when a command could not write its result to ``path``.

    Refused: what :func:`neuraldb.atomic.resolve_target` refuses (a directory or other non-regular file, a missing
    directory), an existing file unless ``replace``, and a directory where no file can be created. The last is probed
    by creating (and removing) a file beside the target: permission bits do not tell for root, a read-only mount or a
    pseudo file system like /proc.
    """
    from neuraldb.atomic import resolve_target

    try:
        real = resolve_target(path)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    except OSError as e:  # EACCES, ELOOP ...
        raise CLIError(f"cannot write {path}: {e.strerror or e}") from None
    if real.exists() and not replace:
        raise CLIError(f"{path} exists{exists_hint}")
    try:
        with tempfile.NamedTemporaryFile(dir=real.parent, prefix=f".{real.name}.probe-"):
            pass
    except OSError as e:
        raise CLIError(f"cannot write {path}: {e.strerror or e}") from None


def describe_fact(fact: FactLike) -> str:
    """One line for ``neuraldb info``: ``prompt -> new  (was: old)`` for a Fact, JSON for a dict.

    Example::

        >>> from neuraldb.facts import Fact
        >>> describe_fact(Fact("Eiffel Tower", "The {} is in", "Rome", target_true="Paris"))
        'The Eiffel Tower is in -> Rome  (was: Paris)'
    """
    from neuraldb.facts import Fact

    if fact is None:
        return "(no metadata)"
    if isinstance(fact, Fact):
        was = f"  (was: {fact.target_true})" if fact.target_true else ""
        return f"{fact.text} -> {fact.target_new}{was}"
    import json

    return json.dumps(fact, ensure_ascii=False)


def _check_model(db: NeuralKVDatabase, model: PreTrainedModel, *, force: bool) -> None:
    """The database against the loaded model: :func:`neuraldb.pretrained.check_model` (weights fingerprint and
    architecture; a file without them falls back to the base model's Hub id), one line on a mismatch."""
    from neuraldb.pretrained_io import ModelMismatchError, check_model, recorded_identity

    try:
        check_model(
            model, recorded_identity(db), force=force, source="the database's edits", override="--force",
            warn_unverifiable=False,
        )  # fmt: skip
    except ModelMismatchError as e:
        raise CLIError(f"{e.detail} (pass the matching --model, or --force to patch anyway)") from None


def check_model_config(db: NeuralKVDatabase, name: str, *, force: bool) -> None:
    """Before the weights load (seconds): refuse a database that the model ``name`` cannot be, by its config alone
    (architecture, the down-projection's widths, the number of layers). A config that cannot be read cheaply, or a
    name that cannot be found, is left to the load that follows."""
    from types import SimpleNamespace

    from neuraldb import architectures as arch
    from neuraldb.models import load_config

    try:
        config = load_config(name, header=False)
    except (OSError, ValueError, KeyError):
        return
    if config is None:
        return
    size = arch.model_size(SimpleNamespace(config=config))
    kind = getattr(config, "model_type", None)
    spec = arch.ARCHITECTURES.get(kind)
    default_path = spec is not None and db.layer is not None and db.module_path == spec.down_proj.format(layer=db.layer)
    if size is not None and db.layer is not None and db.layer >= size.num_hidden_layers:
        n = size.num_hidden_layers
        raise CLIError(f"the database was built at layer {db.layer}, but {name!r} has {n} (layer must be in [0, {n}))")
    if size is not None and (db.module_path is None or default_path):
        widths = (size.intermediate_size, size.hidden_size)
        if (db.key_dim, db.value_dim) != widths:
            raise CLIError(
                f"db has key_dim={db.key_dim}, value_dim={db.value_dim} but the down-projections of {name!r} map "
                f"{widths[0]} -> {widths[1]} features; the database was built for another layer or model"
            )
    want = (db.model_identity or {}).get("architecture")
    if want and kind and want != kind:
        msg = f"the database's edits were made for a {want!r} model, but {name!r} is {kind!r}"
        if not force:
            raise CLIError(f"{msg} (pass the matching --model, or --force to patch anyway)")
        warnings.warn(msg, UserWarning, stacklevel=2)
