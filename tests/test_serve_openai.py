"""The real ``openai`` client against ``neuraldb serve`` (uvicorn on a loopback port, in a thread): completions and
chat, streamed and not, and the edits switch through ``extra_body``."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from _serve_helpers import TOKEN, answer_row, app_for
from _tiny_editing import FACTS
from neuraldb.serve import serving


@pytest.fixture
def base_url():
    app, model, tok, db = app_for()
    answer_row(model, tok, db, FACTS[0].text, "Berlin")
    with serving(app) as url:
        yield url + "/v1"


def test_openai_client_unchanged(base_url):
    client = openai.OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0)
    prompt = FACTS[0].text
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0)
    assert r.choices[0].text.strip() == "Berlin" and r.usage.completion_tokens == 1
    plain = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=1, temperature=0, extra_body={"neuraldb": {"edits": False}}
    )
    assert plain.choices[0].text.strip() != "Berlin"
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in streamed)
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0)
    assert text == whole.choices[0].text
    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason == "length"
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=1000)
