"""Chat: :func:`neuraldb.templates.apply_chat`/``encode_chat``, ``neuraldb generate --chat``, and answers that end at
once (SmolLM2-Instruct's to a question in plain text), on tiny word-level models. The edited fact firing in chat on
the real SmolLM2 is checked in test_cli.py's SmolLM2 round trip."""

from __future__ import annotations

import pytest
from neuraldb import templates
from neuraldb.cli import main
from test_cli import one_error_line

# ChatML without a system turn, in the tiny tokenizer's words: "<s>" opens a turn and "</s>" ends it
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ bos_token }}{{ m['role'] }} {{ m['content'] }}{{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token }}assistant {% endif %}"
)


def _tokenizer(*, chat: bool = True, adds_bos: bool = False):
    """The tiny word-level tokenizer of test_models, with CHAT_TEMPLATE, and a start token on every text if
    ``adds_bos`` (as Llama's and Gemma's tokenizers do)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "paris", "is", "in", "france", "the", "capital", "of", "user", "assistant"]
    tk = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = Whitespace()
    if adds_bos:
        tk.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


# --- neuraldb.templates -----------------------------------------------------------------------------------------------


def test_apply_chat_asks_the_text_as_a_user_turn_and_opens_the_answer():
    assert templates.has_chat_template(_tokenizer())
    assert templates.apply_chat(_tokenizer(), "the capital of france is") == (
        "<s>user the capital of france is</s> <s>assistant "
    )


def test_encode_chat_adds_no_second_start_token():
    # The chat template writes "<s>" itself; the tokenizer's own "<s>" on top would put two at the start.
    tok = _tokenizer(adds_bos=True)
    assert tok("paris")["input_ids"] == [1, 3]  # the tokenizer does add one to plain text
    ids = templates.encode_chat(tok, "paris is in")
    assert ids == [1, 10, 3, 4, 5, 2, 1, 11]
    assert templates.encode(tok, None, "paris")[0] == 1  # plain text keeps the tokenizer's start token


def test_apply_chat_refuses_a_tokenizer_without_a_chat_template():
    tok = _tokenizer(chat=False)
    assert not templates.has_chat_template(tok)
    with pytest.raises(ValueError, match=r"^tok \(.*\) has no chat template .*templates\.encode"):
        templates.apply_chat(tok, "paris is in")
    with pytest.raises(TypeError, match="text must be a string or a non-empty list of message dicts, got list"):
        templates.apply_chat(_tokenizer(), ["paris"])


def test_a_conversation_is_one_user_turn_when_it_is_one_user_message():
    tok = _tokenizer()
    turn = [{"role": "user", "content": "paris is in"}]
    assert templates.encode_chat(tok, turn) == templates.encode_chat(tok, "paris is in")
    two = templates.apply_chat(tok, [{"role": "system", "content": "be brief"}, *turn])
    assert "be brief" in two and two.endswith(templates.apply_chat(tok, "paris is in").split("paris is in")[-1])


# --- neuraldb generate ------------------------------------------------------------------------------------------------


def _model_dir(path, *, chat: bool, ends_at_once: bool = False):
    """A random two-layer Llama over _tokenizer's words, saved as a HF directory; with ``ends_at_once`` its first
    token is always its end token "</s>", as SmolLM2-Instruct's answer to a question in plain text is its end-of-turn
    token."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(chat=chat)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    if ends_at_once:
        others = [i for i in range(len(tok)) if i != tok.eos_token_id]
        GenerationConfig(bos_token_id=1, eos_token_id=2, suppress_tokens=others).save_pretrained(path)
    return path


def test_generate_shows_an_answer_that_ends_at_once(tmp_path, capsys):
    model = _model_dir(tmp_path / "m", chat=True, ends_at_once=True)
    capsys.readouterr()  # saving prints progress
    assert main(["generate", "--model", str(model), "-p", "paris is in", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    # Decoded without its special tokens this answer is "": the line would read "unedited:  " and nothing more
    assert "unedited:  (no text: the model generated '</s>')" in captured.out.splitlines()
    assert "--chat asks it in its chat template" in captured.err


def test_generate_chat_asks_through_the_chat_template(tmp_path, capsys, monkeypatch):
    model = _model_dir(tmp_path / "m", chat=True)
    capsys.readouterr()  # saving prints progress
    asked = []
    encode_chat = templates.encode_chat
    monkeypatch.setattr(templates, "encode_chat", lambda tok, text: asked.append(text) or encode_chat(tok, text))
    argv = ["generate", "--model", str(model), "-p", "paris is in", "--max-new-tokens", "2", "--threads", "1"]
    assert main([*argv, "--chat"]) == 0
    assert asked == ["paris is in"]
    assert "unedited:" in capsys.readouterr().out
    assert main(argv) == 0
    assert asked == ["paris is in"]  # without --chat, the text template


def test_generate_chat_without_a_chat_template_is_one_line(tmp_path, capsys):
    model = _model_dir(tmp_path / "m", chat=False)
    capsys.readouterr()  # saving prints progress
    assert main(["generate", "--model", str(model), "--chat", "-p", "paris is in", "--threads", "1"]) == 1
    captured = capsys.readouterr()
    assert "--chat: the tokenizer of " in one_error_line(captured.err)
    assert "has no chat template; drop --chat" in captured.err
    assert "unedited" not in captured.out
