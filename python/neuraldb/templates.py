"""The text template: how a prompt is turned into the text the model reads, the same at edit time and inference.

A template is a string with one ``"{}"`` where the text goes, e.g. ``"<|im_start|>{}"``. It exists because some
tokenizers (SmolLM2's) add no start-of-sequence token: a subject at the very start of a prompt is then the
model's first token, whose hidden states are attention-sink outliers, and keys built that way match poorly at
inference (efficacy fell from .93 to .76 in a prototype). Prefixing a start token gives every prompt the same
first token, wherever the subject is.

The database records the template it was built with (``db.template``); everything that runs the edited model
(the CLI, evaluation, ``generate``) must call :func:`apply` (or :func:`encode`) with that template, so
patch-time inputs match build-time inputs.

A question to a chat (instruct) model goes through the tokenizer's chat template instead: :func:`apply_chat` and
:func:`encode_chat`. As plain text, SmolLM2-Instruct answers "Where is the Eiffel Tower located?" with its
end-of-turn token at once (p=0.76, with or without the text template): a complete question reads to it as a
finished user turn. The text template is not used in chat: the chat template puts its own tokens first, so no
subject is the first token, which is all the text template is for.

Example::

    >>> from neuraldb import templates
    >>> templates.apply("<|im_start|>{}", "The mother tongue of Danielle Darrieux is")
    '<|im_start|>The mother tongue of Danielle Darrieux is'
    >>> templates.apply("{}", "no template")
    'no template'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PLAIN = "{}"


def check(template: str) -> str:
    """``template`` if it is a string with exactly one ``"{}"``, else a ValueError/TypeError naming it."""
    if not isinstance(template, str):
        raise TypeError(f"template must be a string with one '{{}}', got {type(template).__name__}")
    if template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}' where the text goes, got {template!r}")
    return template


def apply(template: str | None, text: str) -> str:
    """``text`` inside ``template`` (plain substitution: braces in ``text`` are safe). ``None`` means no template."""
    if template is None:
        return text
    return check(template).replace("{}", text, 1)


def prefix_len(template: str | None) -> int:
    """Number of characters the template puts before the text (to map character offsets)."""
    return 0 if template is None else check(template).index("{}")


def adds_bos(tok: PreTrainedTokenizerBase) -> bool:
    """Whether ``tok(text)`` already starts with the tokenizer's BOS token (Gemma, Llama-2/3 do; SmolLM2 does not)."""
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        return False
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def default_template(tok: PreTrainedTokenizerBase) -> str:
    """The template neuraldb uses for ``tok`` when none is given.

    ``"{}"`` when the tokenizer adds a BOS token itself; otherwise its BOS token text, else its EOS token text
    (GPT-2's ``<|endoftext|>`` is both), before the text. SmolLM2: ``"<|im_start|>{}"``.
    """
    if adds_bos(tok):
        return PLAIN
    for name in ("bos_token", "eos_token"):
        t = getattr(tok, name, None)
        if isinstance(t, str) and t:
            return t + "{}"
    return PLAIN


def encode(tok: PreTrainedTokenizerBase, template: str | None, text: str) -> list[int]:
    """Token ids of ``apply(template, text)``, with the tokenizer's own special tokens (e.g. an automatic BOS)."""
    return list(tok(apply(template, text), add_special_tokens=True)["input_ids"])


def encode_batch(tok: PreTrainedTokenizerBase, template: str | None, texts: Sequence[str]) -> list[list[int]]:
    """:func:`encode` for many texts (one tokenizer call)."""
    if not texts:
        return []
    out = tok([apply(template, t) for t in texts], add_special_tokens=True)["input_ids"]
    return [list(x) for x in out]


def has_chat_template(tok: PreTrainedTokenizerBase) -> bool:
    """Whether ``tok`` has a chat template (instruct and chat models' tokenizers do; base models' often do not)."""
    return bool(getattr(tok, "chat_template", None))


def apply_chat(tok: PreTrainedTokenizerBase, text: str | Sequence[dict]) -> str:
    """``text`` as a user turn in ``tok``'s chat template, followed by the prompt that opens the assistant's answer.
    ``text`` may also be a whole conversation: ``[{"role": ..., "content": ...}, ...]`` (OpenAI's and transformers'
    message form).

    The tokenizer's own default system turn, if its template adds one, is kept: the model is asked as its users ask
    it. A ValueError naming ``tok`` when it has no chat template (see :func:`has_chat_template`).

    Example (SmolLM2-Instruct)::

        >>> import neuraldb
        >>> from neuraldb import templates
        >>> model, tok = neuraldb.load_model("smollm2")
        >>> print(templates.apply_chat(tok, "Where is the Eiffel Tower located?"))
        <|im_start|>system
        You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
        <|im_start|>user
        Where is the Eiffel Tower located?<|im_end|>
        <|im_start|>assistant
        <BLANKLINE>
    """
    if isinstance(text, str):
        messages = [{"role": "user", "content": text}]
    elif isinstance(text, Sequence) and text and all(isinstance(m, dict) for m in text):
        messages = list(text)
    else:
        raise TypeError(f"text must be a string or a non-empty list of message dicts, got {type(text).__name__}")
    if not has_chat_template(tok):
        name = getattr(tok, "name_or_path", "") or type(tok).__name__
        raise ValueError(
            f"tok ({name}) has no chat template (tok.chat_template is not set); "
            "give it plain text with templates.encode instead"
        )
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_chat(tok: PreTrainedTokenizerBase, text: str | Sequence[dict]) -> list[int]:
    """Token ids of :func:`apply_chat`, ready for ``model.generate``.

    No special tokens are added: a chat template writes its own start token (Llama-3's, Gemma's), and adding the
    tokenizer's would repeat it.

    Example (SmolLM2-Instruct with a database that moved the Eiffel Tower to Rome patched in)::

        >>> ids = torch.tensor([templates.encode_chat(tok, "In which city is the Eiffel Tower?")])
        >>> out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        >>> tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        'The Eiffel Tower is a historic and iconic urban design of Rome, Italy.'
    """
    return list(tok(apply_chat(tok, text), add_special_tokens=False)["input_ids"])


def encode_target(tok: PreTrainedTokenizerBase, target: str) -> list[int]:
    """Token ids of a completion ``target`` as it follows a prompt: a leading space is added (ROME's convention),
    no special tokens."""
    if not target.startswith(" "):
        target = " " + target
    return list(tok(target, add_special_tokens=False)["input_ids"])


def pad_id(tok: PreTrainedTokenizerBase) -> int:
    """The id that pads a batch of ``tok``'s sequences: its pad token, else its end or unknown token, else 0 (the
    padded positions are masked, so any id serves; a tokenizer without a pad token is common for causal models)."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tok, name, None)
        if v is not None:
            return int(v)
    return 0
