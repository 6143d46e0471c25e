"""``neuraldb serve`` under load and faults, on loopback and bounded in count and time.

- Concurrent clients generate while another client adds and deletes facts over HTTP: no request fails, and no answer
  mixes two database states. The facts' rows are made to be recognisable (each opens at its prompt's last token and
  makes its ``target_new`` the next token; no editing), and the writer adds two facts in one job and deletes them one
  at a time, so the database only ever holds {}, {F0, F1} or {F1}. Every request asks both prompts at once, which the
  server runs in one batch, so one forward answers both: each pair of answers must be what exactly one of those
  states answers, and never {F0} (a forward that saw half a job).
- kill -9 during a stream of writes: ``benchmarks/bench_serve.py --kill-trials 2`` (20 trials there) kills a real
  ``neuraldb serve`` process at a random moment, checks the file loads, restarts it on the same database and checks
  every acknowledged fact is there and every acknowledged delete stays done. Two trials only: each starts the server
  twice, most of its ~25 s (2 busy cores) importing torch and transformers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import torch
from _serve_helpers import AUTH, LAST_LAYER, app_for, row_for
from _tiny_editing import FACTS
from neuraldb.serve import serving

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 4
SECONDS = 3.0


def _record(fact):
    return {"subject": fact.subject, "prompt": fact.prompt, "target_new": fact.target_new}


def test_concurrent_generation_while_facts_change_never_mixes_states():
    app, model, tok, db = app_for(layer=LAST_LAYER, max_batch=4 * CLIENTS)  # a request's two prompts never split
    f0, f1 = FACTS[0], FACTS[1]
    rows = {f.text: row_for(model, tok, db.template, f.text, f.target_new) for f in (f0, f1)}

    def editor(facts):  # the rows above instead of editing: their answers are known
        keys, residuals = zip(*(rows[f.text] for f in facts))
        return torch.stack(keys), torch.stack(residuals)

    app.state.neuraldb.store.editor = editor
    ask = {"prompt": [f0.text, f1.text], "max_tokens": 2, "temperature": 0}

    with serving(app) as base, httpx.Client(base_url=base, timeout=60) as http:

        def pair(edits=True):
            r = http.post("/v1/completions", json={**ask, "neuraldb": {"edits": edits}})
            assert r.status_code == 200, r.text
            return tuple(c["text"] for c in r.json()["choices"])

        def write(method, url, **kw):
            r = http.request(method, url, headers=AUTH, **kw)
            assert r.status_code == 200, r.text
            return r.json()

        # each state's answers, asked one at a time
        empty = pair()
        ids = write("POST", "/v1/facts?wait=true", json={"facts": [_record(f0), _record(f1)]})["ids"]
        both = pair()
        write("DELETE", f"/v1/facts/{ids[0]}")
        only_f1 = pair()
        write("DELETE", f"/v1/facts/{ids[1]}")
        assert pair() == empty and empty[0] != both[0] and empty[1] != both[1], (empty, both)
        assert only_f1 == (empty[0], both[1])
        states = {empty: "{}", both: "{F0, F1}", only_f1: "{F1}"}

        seen: dict[str, int] = {}
        failures: list[str] = []
        writes = [0]
        deadline = time.monotonic() + SECONDS

        def client(k):
            n = 0
            try:
                while time.monotonic() < deadline:
                    edits = (n + k) % 3 != 0  # a third of the requests without the edits
                    got = pair(edits)
                    state = states.get(got) if edits else ("unedited" if got == empty else None)
                    if state is None:
                        failures.append(f"client {k}: {got} (edits={edits}) is no database state's answer")
                    seen[state] = seen.get(state, 0) + 1
                    n += 1
            except Exception as e:
                failures.append(f"client {k}: {type(e).__name__}: {e}")

        def writer():
            try:
                while time.monotonic() < deadline:
                    a, b = write("POST", "/v1/facts?wait=true", json={"facts": [_record(f0), _record(f1)]})["ids"]
                    write("DELETE", f"/v1/facts/{a}")
                    write("DELETE", f"/v1/facts/{b}")
                    writes[0] += 3
            except Exception as e:
                failures.append(f"writer: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        threads.append(threading.Thread(target=writer))
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not failures, failures[:5]
        assert writes[0] >= 3 and sum(seen.values()) >= CLIENTS, (writes, seen)
        assert len([s for s in seen if s != "unedited"]) >= 2, seen  # the answers did follow the changes
        assert http.get("/v1/facts").json()["total"] == 0 and len(db) == 0


def test_kill_9_during_writes_loses_no_acknowledged_fact(tmp_path):
    out = tmp_path / "serve.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--kill-trials", "2", "--throughput-rounds"]
    proc = subprocess.run([*cmd, "0", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    trials = result["kill"]["trials"]
    assert len(trials) == 2
    for t in trials:
        assert t["file_loads"] and t["lost"] == [] and t["resurrected"] == [], t
    assert sum(t["acknowledged_adds"] for t in trials) > 0
