"""``neuraldb serve`` through FastAPI's TestClient on the tiny word-level Llama: OpenAI-shaped completions and chat
(greedy, sampled, stop, streaming, batching), the per-request edits switch, the facts API and its errors."""

from __future__ import annotations

import json
import sys
import threading

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from _serve_helpers import AUTH, answer_row, app_for
from _tiny_editing import FACTS
from fastapi.testclient import TestClient

PROMPT = FACTS[0].text


def _complete(client, prompt=PROMPT, **kw):
    r = client.post("/v1/completions", json={"prompt": prompt, "temperature": 0, "max_tokens": 4, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def _events(text: str) -> list:
    lines = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


@pytest.fixture
def served(request):
    app, model, tok, db = app_for(layer=getattr(request, "param", 3))
    with TestClient(app) as client:
        yield client, model, tok, db


def test_completion_greedy_sampled_and_stop(served):
    client, *_ = served
    a, b = _complete(client), _complete(client)
    assert a["object"] == "text_completion" and a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["choices"][0]["finish_reason"] == "length"
    assert a["usage"]["completion_tokens"] == 4 and a["usage"]["total_tokens"] == a["usage"]["prompt_tokens"] + 4
    s1 = _complete(client, temperature=1.0, seed=7, max_tokens=6)["choices"][0]["text"]
    s2 = _complete(client, temperature=1.0, seed=7, max_tokens=6)["choices"][0]["text"]
    assert s1 == s2  # a seed makes sampling repeatable
    words = a["choices"][0]["text"].split()
    stopped = _complete(client, stop=[" " + words[1]])["choices"][0]
    assert stopped["text"] == words[0]
    assert stopped["finish_reason"] == "stop"
    several = client.post("/v1/completions", json={"prompt": [PROMPT, FACTS[1].text], "temperature": 0}).json()
    assert [c["index"] for c in several["choices"]] == [0, 1]


def test_streaming_matches_and_chat(served):
    client, *_ = served
    whole = _complete(client)["choices"][0]["text"]
    r = client.post("/v1/completions", json={"prompt": PROMPT, "temperature": 0, "max_tokens": 4, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = _events(r.text)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    chat = {"messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 4}
    body = client.post("/v1/chat/completions", json=chat).json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    chunks = _events(client.post("/v1/chat/completions", json={**chat, "stream": True}).text)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == body["choices"][0]["message"]["content"]


def _concurrently(client, bodies):
    out = [None] * len(bodies)

    def go(i):
        out[i] = client.post("/v1/completions", json=bodies[i]).json()["choices"][0]["text"]

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_batched_answers_equal_solo_answers_and_edits_never_mix(served):
    client, model, tok, db = served
    answer_row(model, tok, db, PROMPT, "Berlin")
    prompts = [f.text for f in FACTS]
    bodies = [
        {"prompt": p, "temperature": 0, "max_tokens": 3, "neuraldb": {"edits": i % 2 == 0}}
        for i, p in enumerate(prompts * 2)
    ]
    solo = [_complete(client, b["prompt"], max_tokens=3, neuraldb=b["neuraldb"])["choices"][0]["text"] for b in bodies]
    batches = client.app.state.neuraldb.generator.batches
    together = _concurrently(client, bodies)
    assert together == solo
    assert client.app.state.neuraldb.generator.batches - batches < len(bodies)  # some ran together
    edited = _complete(client, max_tokens=1)["choices"][0]["text"]
    plain = _complete(client, max_tokens=1, neuraldb={"edits": False})["choices"][0]["text"]
    assert edited.strip() == "Berlin" and plain.strip() != "Berlin"


@pytest.mark.parametrize("served", [2], indirect=True)
def test_add_fact_answers_then_delete(served):
    client, *_ = served
    before = _complete(client, max_tokens=3)["choices"][0]["text"]
    r = client.post("/v1/facts?wait=true", json={"facts": [FACTS[0].__dict__ | {"extras": None}]}, headers=AUTH)
    assert r.status_code == 400  # extras is not a field of the API's facts
    fact = {"subject": FACTS[0].subject, "prompt": FACTS[0].prompt, "target_new": FACTS[0].target_new}
    r = client.post("/v1/facts?wait=true", json=fact, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ids"] == [0] and body["job"]["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{body['job']['id']}").json()["status"] == "succeeded"
    after = _complete(client, max_tokens=3)["choices"][0]["text"]
    assert after != before  # the next request sees the edit
    assert _complete(client, max_tokens=3, neuraldb={"edits": False})["choices"][0]["text"] == before
    listed = client.get("/v1/facts", params={"q": "darrieux"}).json()
    assert listed["total"] == 1 and listed["data"][0]["target_new"] == "English"
    r = client.post(
        "/v1/facts",
        json={"facts": [{"subject": "Toko Yasuda", "prompt": "{} plays the", "target_new": "piano"}]},
        headers=AUTH,
    )
    assert r.status_code in (200, 202) and r.json()["ids"] == [1]
    job = r.json()["job"]["id"]
    client.app.state.neuraldb.store.job(job).done.wait(60)
    assert client.get(f"/v1/jobs/{job}").json()["status"] == "succeeded"
    assert client.delete("/v1/facts/0", headers=AUTH).json() == {"id": 0, "object": "neuraldb.fact", "deleted": True}
    assert _complete(client, max_tokens=3)["choices"][0]["text"] == before
    assert client.delete("/v1/facts/0", headers=AUTH).status_code == 404
    assert [f["id"] for f in client.get("/v1/facts").json()["data"]] == [1]


def test_added_facts_get_the_thresholds_calibrate_fits():
    import copy
    import time

    from neuraldb.calibration import calibrate
    from neuraldb.patching import disabled

    app, model, tok, db = app_for(layer=2)
    facts = [{"subject": f.subject, "prompt": f.prompt, "target_new": f.target_new} for f in FACTS[:3]]
    with TestClient(app) as client:
        job = client.post("/v1/facts?wait=true", json={"facts": facts}, headers=AUTH).json()["job"]
        assert job["status"] == "succeeded" and job["thresholds"] in ("pending", "fitted")
        deadline = time.time() + 60
        while client.get(f"/v1/jobs/{job['id']}").json()["thresholds"] == "pending" and time.time() < deadline:
            time.sleep(0.02)
        assert client.get(f"/v1/jobs/{job['id']}").json()["thresholds"] == "fitted"
        with db.lock:
            fitted, alone = db.thresholds.clone(), copy.deepcopy(db)
        with disabled(model):
            calibrate(model, tok, alone, None)
        assert (fitted > 0.65).any()  # the tiny facts do get thresholds above the default gamma
        assert torch.equal(fitted, alone.thresholds)  # what `neuraldb edit` would have fitted for these facts
    app, *_ = app_for(layer=2, calibrate=False)
    with TestClient(app) as client:
        job = client.post("/v1/facts?wait=true", json=facts[0], headers=AUTH).json()["job"]
        assert job["status"] == "succeeded" and job["thresholds"] is None


def test_edit_in_place_pauses_generation_and_answers_with_the_fact():
    app, *_ = app_for(layer=2, edit_on_copy=False)
    fact = {"subject": FACTS[0].subject, "prompt": FACTS[0].prompt, "target_new": FACTS[0].target_new}
    with TestClient(app) as client:
        before = _complete(client, max_tokens=3)["choices"][0]["text"]
        assert client.post("/v1/facts?wait=true", json=fact, headers=AUTH).json()["job"]["status"] == "succeeded"
        assert _complete(client, max_tokens=3)["choices"][0]["text"] != before
        assert _complete(client, max_tokens=3, neuraldb={"edits": False})["choices"][0]["text"] == before


def test_writes_need_the_token():
    app, *_ = app_for()
    fact = {"subject": "Toko Yasuda", "prompt": "{} plays the", "target_new": "piano"}
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-token"}):
            r = client.post("/v1/facts", json=fact, headers=headers)
            assert r.status_code == 401 and "token" in r.json()["error"]["message"]
            assert client.delete("/v1/facts/0", headers=headers).status_code == 401
        assert client.get("/v1/facts").status_code == 200  # reads are open by default
        assert client.app.state.neuraldb.db.next_id == 0
    app, *_ = app_for(token=None)
    with TestClient(app) as client:
        r = client.post("/v1/facts", json=fact, headers=AUTH)
        assert r.status_code == 403 and "--token" in r.json()["error"]["message"]
    app, *_ = app_for(protect_reads=True)
    with TestClient(app) as client:
        assert client.get("/v1/facts").status_code == 401
        assert client.post("/v1/completions", json={"prompt": PROMPT}).status_code == 401
        assert client.get("/v1/facts", headers=AUTH).status_code == 200


def test_bad_input_is_a_4xx_that_changes_nothing(tmp_path):
    path = tmp_path / "facts.safetensors"
    app, _, _, db = app_for(db_path=path, max_body_bytes=4096, calibrate=False)  # no save after the answer
    with TestClient(app) as client:
        good = {"subject": "Toko Yasuda", "prompt": "{} plays the", "target_new": "piano"}
        assert client.post("/v1/facts?wait=true", json=good, headers=AUTH).status_code == 200
        saved = path.read_bytes()

        def post(url, **kw):
            return client.post(url, headers={**AUTH, "Content-Type": "application/json"}, **kw)

        cases = [
            (post("/v1/facts", content=b"{not json"), 400, "JSON"),
            (post("/v1/completions", content=b'{"prompt": '), 400, "JSON"),
            (post("/v1/completions", json={"prompt": PROMPT, "max_tokens": "5"}), 400, "max_tokens"),
            (post("/v1/completions", json={"prompt": PROMPT, "temperature": 5}), 400, "temperature"),
            (post("/v1/completions", json={"prompt": PROMPT, "n": 2}), 400, "n"),
            (post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 500}), 400, "context"),
            (post("/v1/completions", json={"prompt": " the" * 200}), 400, "context"),
            (post("/v1/completions", json={"prompt": PROMPT, "neuraldb": {"edits": "no"}}), 400, "edits"),
            (post("/v1/chat/completions", json={"messages": []}), 400, "messages"),
            (post("/v1/facts", json={"subject": "Paris", "prompt": "Rome is in", "target_new": "x"}), 400, "subject"),
            (post("/v1/facts", json={"subject": "x", "prompt": "{} is", "target_new": 3}), 400, "target_new"),
            (post("/v1/facts", json={"facts": []}), 400, "facts"),
            (post("/v1/facts", json={**good, "prompt": "{} plays the" + " the" * 200}), 400, "context"),
            (post("/v1/facts", content=json.dumps({"facts": [good] * 100}).encode()), 413, "bytes"),
            (client.delete("/v1/facts/99", headers=AUTH), 404, "99"),
            (client.delete("/v1/facts/abc", headers=AUTH), 400, "fact_id"),
            (client.get("/v1/jobs/99"), 404, "99"),
        ]
        for r, status, word in cases:
            assert r.status_code == status, (r.status_code, r.text)
            assert word in r.json()["error"]["message"], r.json()
        assert len(db) == 1 and db.next_id == 1 and path.read_bytes() == saved


def test_durable_restart_has_every_acknowledged_fact(tmp_path):
    path = tmp_path / "facts.safetensors"
    app, *_ = app_for(db_path=path, layer=2)
    facts = [
        {"subject": f.subject, "prompt": f.prompt, "target_new": f.target_new, "target_true": f.target_true}
        for f in FACTS[:3]
    ]
    with TestClient(app) as client:
        assert client.post("/v1/facts?wait=true", json={"facts": facts[:2]}, headers=AUTH).json()["ids"] == [0, 1]
        assert client.post("/v1/facts?wait=true", json=facts[2], headers=AUTH).json()["ids"] == [2]
        assert client.delete("/v1/facts/1", headers=AUTH).status_code == 200
        answer = _complete(client)["choices"][0]["text"]
    app, *_ = app_for(db_path=path)
    with TestClient(app) as client:
        listed = client.get("/v1/facts").json()["data"]
        assert [(f["id"], f["subject"]) for f in listed] == [(0, FACTS[0].subject), (2, FACTS[2].subject)]
        assert _complete(client)["choices"][0]["text"] == answer
        # ids are never reused after a restart
        r = client.post("/v1/facts?wait=true", json=facts[1], headers=AUTH)
        assert r.json()["ids"] == [3]


def test_serve_command_without_fastapi_says_how_to_install(tmp_path):
    import subprocess

    code = (
        "import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
        "import neuraldb.serve, neuraldb.serve.command, neuraldb.serve.store, neuraldb.serve.generation\n"
        "from neuraldb.cli import main; sys.exit(main(['serve', '--model', 'nonexistent']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install" in lines[0] and "fastapi" in lines[0], r.stderr
