"""``neuraldb serve`` under faults and load: kill -9 during a stream of writes, and served tokens/s with the patch vs
without it, in one run.

    python benchmarks/bench_serve.py --threads 1                      # 20 kill trials, then SmolLM2 throughput
    python benchmarks/bench_serve.py --kill-trials 3 --throughput-rounds 0 --out /tmp/serve.json   # the test's run

**kill -9** (``--kill-trials``): the tests' tiny word-level Llama (tests/_tiny_editing.py) is saved as a Hugging Face
directory and served by the real command, ``neuraldb serve --model DIR --db DB --token T``, in a subprocess. Two
writers stream facts at it over loopback: one posts single facts without waiting (acknowledged = 202/200 with ids:
journaled; one every 0.1 s, so that the restart has tens of jobs to replay, not hundreds), the other posts one with
``?wait=true`` (acknowledged = edited and saved), deletes it (acknowledged = 200) and goes on. At a random moment
(uniform in ``--kill-window`` seconds after the writes start) the server gets SIGKILL. Then: the
database file must load (``NeuralKVDatabase.load``), the server is restarted on the same file, replays its journal,
and once nothing is pending every acknowledged add must be stored (``lost``) unless its delete was sent (a delete
the kill cut short may or may not have been done: it was not acknowledged), and no acknowledged delete may be back
(``resurrected``). The same database is used by every trial, so the acknowledged
facts of all earlier trials are checked again at each restart.

**Throughput** (``--throughput-rounds``): ``--model`` (SmolLM2-135M) served by two in-process uvicorn servers on
loopback, one patched with a database of ``--facts`` random rows (random unit keys and random residuals: such keys
never open the gate, so this measures what the retrieval scan costs every forward, not what an opened gate adds),
one on an unpatched copy of the model; also the patched server asked with ``"neuraldb": {"edits": false}``.
``--clients`` threads each send ``--requests`` greedy completions of ``--max-tokens`` tokens per round, in waves that
leave together (a barrier) into a server that waits 50 ms to fill a batch, so every round runs the same batches;
tokens/s = completion tokens over the round's wall time. Rounds of the variants alternate (ABC CBA ...) so that load from other
processes hits them alike; the ratio is patched over unpatched, of the medians.

Results: ``--out`` (default docs/results/serve/bench_serve.json) with the machine description.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import ROOT, machine_description, write_json

TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, url: str, body: object = None, timeout: float = 120) -> tuple[int, dict]:
    """One HTTP request on a fresh loopback connection: ``(status, JSON body)``; raises on a broken connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        conn.request(method, url, json.dumps(body) if body is not None else None, headers)
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def wait_healthy(port: int, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        with contextlib.suppress(OSError):
            if request(port, "GET", "/health", timeout=2)[0] == 200:
                return
        time.sleep(0.1)
    raise TimeoutError("the server did not answer /health")


# -- kill -9 -----------------------------------------------------------------------------------------------------------


def tiny_model_dir(where: Path) -> tuple[Path, list[dict]]:
    """The tests' tiny word-level Llama saved as a Hugging Face directory, and facts in its vocabulary."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _tiny_editing import FACTS, word_llama

    model, tok = word_llama()
    model.save_pretrained(where)
    tok.save_pretrained(where)
    facts = [{"subject": f.subject, "prompt": f.prompt, "target_new": f.target_new} for f in FACTS]
    return where, facts


def start_server(model_dir: Path, db: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "neuraldb.cli", "serve", "--model", str(model_dir), "--db", str(db)]
    cmd += ["--token", TOKEN, "--port", str(port), "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    wait_healthy(port, proc)
    return proc, port


def write_stream(
    port: int, facts: list[dict], cycle: bool, stop: threading.Event, adds: list, deletes: list, sent: list
) -> None:
    """Write until the connection breaks (the kill) or ``stop``, recording what the server acknowledged: single
    facts without waiting, or (``cycle``) a fact with ``?wait=true`` then its delete (``sent`` gets the id before the
    DELETE goes out: a delete the kill cut short may or may not have been done)."""
    i = 0
    try:
        while not stop.is_set():
            fact = facts[i % len(facts)]
            i += 1
            if not cycle:
                status, body = request(port, "POST", "/v1/facts", fact)
                if status not in (200, 202):
                    raise RuntimeError(f"POST answered {status}: {body}")
                adds.extend(body["ids"])
                stop.wait(0.1)
                continue
            status, body = request(port, "POST", "/v1/facts?wait=true", fact)
            if status != 200:
                raise RuntimeError(f"POST ?wait=true answered {status}: {body}")
            adds.extend(body["ids"])
            sent.append(body["ids"][0])
            status, body = request(port, "DELETE", f"/v1/facts/{body['ids'][0]}")
            if status != 200:
                raise RuntimeError(f"DELETE answered {status}: {body}")
            deletes.append(body["id"])
    except (OSError, http.client.HTTPException):
        pass  # the server was killed: this request was not acknowledged


def stored_after_replay(port: int, timeout: float = 300) -> tuple[set[int], int]:
    """The stored ids once no fact is pending, and how many were pending at first (the replayed jobs' facts)."""
    deadline, first = time.monotonic() + timeout, None
    while True:
        status, body = request(port, "GET", "/v1/facts?limit=10000")
        assert status == 200, body
        pending = [f["id"] for f in body["data"] if f["status"] == "pending"]
        first = len(pending) if first is None else first
        if not pending:
            return {f["id"] for f in body["data"]}, first
        if time.monotonic() > deadline:
            raise TimeoutError(f"facts still pending after {timeout} s: {pending}")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def kill_trials(n: int, window: tuple[float, float], seed: int) -> dict:
    from neuraldb import NeuralKVDatabase
    from neuraldb.serve.store import journal_path

    rng = random.Random(seed)
    trials = []
    with tempfile.TemporaryDirectory(prefix="neuraldb-kill-") as tmp:
        model_dir, facts = tiny_model_dir(Path(tmp) / "tiny")
        db = Path(tmp) / "facts.safetensors"
        acked_adds: set[int] = set()
        acked_deletes: set[int] = set()
        unsure: set[int] = set()
        for trial in range(n):
            proc, port = start_server(model_dir, db)
            adds: list[int] = []
            deletes: list[int] = []
            sent: list[int] = []
            stop = threading.Event()
            writers = [
                threading.Thread(target=write_stream, args=(port, facts, cycle, stop, adds, deletes, sent), daemon=True)
                for cycle in (False, True)
            ]
            for w in writers:
                w.start()
            after = rng.uniform(*window)
            time.sleep(after)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            stop.set()
            for w in writers:
                w.join(60)
            acked_adds.update(adds)
            acked_deletes.update(deletes)
            unsure.update(set(sent) - set(deletes))  # deletes in flight at the kill: either outcome is right
            try:
                NeuralKVDatabase.load(db)
                loads = True
            except Exception as e:
                loads, load_error = False, f"{type(e).__name__}: {e}"
            lines = journal_path(db).read_text(encoding="utf-8").splitlines() if journal_path(db).exists() else []
            torn = sum(1 for line in lines if not _is_json(line))
            proc, port = start_server(model_dir, db)
            try:
                stored, replayed = stored_after_replay(port)
            finally:
                stop_server(proc)
            row = {
                "trial": trial,
                "killed_after_s": round(after, 3),
                "acknowledged_adds": len(adds),
                "acknowledged_deletes": len(deletes),
                "file_loads": loads,
                "torn_journal_lines": torn,
                "replayed_facts": replayed,
                "stored": len(stored),
                "deletes_in_flight": len(set(sent) - set(deletes)),
                "lost": sorted(acked_adds - acked_deletes - unsure - stored),
                "resurrected": sorted(acked_deletes & stored),
            }
            if not loads:
                row["load_error"] = load_error
            trials.append(row)
            print(
                f"trial {trial:2d}: killed after {after:5.2f} s, {len(adds):3d} adds / {len(deletes):2d} deletes "
                f"acknowledged ({row['deletes_in_flight']} delete in flight), file loads: {loads}, torn journal lines: {torn}, replayed {replayed:2d}, "
                f"lost {len(row['lost'])}, resurrected {len(row['resurrected'])}",
                flush=True,
            )
    return {
        "trials": trials,
        "acknowledged_adds": len(acked_adds),
        "acknowledged_deletes": len(acked_deletes),
        "lost": sum(len(t["lost"]) for t in trials),
        "corrupt_files": sum(not t["file_loads"] for t in trials),
    }


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


# -- throughput ----------------------------------------------------------------------------------------------------

PROMPTS = [
    "The capital of France is",
    "The Eiffel Tower is located in the city of",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "Mount Everest is the highest mountain in",
    "The author of Hamlet was",
    "The chemical symbol for gold is",
    "The Great Wall of China was built to",
]


@contextlib.contextmanager
def serving_port(app):
    from neuraldb.serve import serving

    with serving(app) as url:
        port = int(url.rsplit(":", 1)[1])
        wait_healthy(port)
        yield port


def one_round(port: int, clients: int, requests: int, max_tokens: int, edits: bool) -> tuple[int, float]:
    tokens = [0] * clients
    errors: list[str] = []
    # Each wave of requests leaves together, so the server sees the same batches in every round: without it, which
    # requests happened to share a batch moved single rounds by up to 2x.
    wave = threading.Barrier(clients)

    def client(k: int) -> None:
        for j in range(requests):
            wave.wait()
            body = {"prompt": PROMPTS[(k + j) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
            body["neuraldb"] = {"edits": edits}
            status, out = request(port, "POST", "/v1/completions", body, timeout=600)
            if status != 200:
                errors.append(f"{status}: {out}")
                return
            tokens[k] += out["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"requests failed: {errors[:3]}")
    return sum(tokens), wall


def throughput(args: argparse.Namespace) -> dict:
    import copy

    import neuraldb
    from neuraldb.patching import unpatch_model
    from neuraldb.serve import ServeSettings, build_app

    model, tok = neuraldb.load_model(args.model)
    plain_model = copy.deepcopy(model)
    db = neuraldb.NeuralKVDatabase.for_model(model)
    gen = torch.Generator().manual_seed(0)
    for start in range(0, args.facts, 1000):
        n = min(1000, args.facts - start)
        db.add(torch.randn(n, db.key_dim, generator=gen), 0.05 * torch.randn(n, db.value_dim, generator=gen))
    empty = neuraldb.NeuralKVDatabase.for_model(plain_model)
    # a wait long enough for a wave of requests to arrive through uvicorn before the batch starts
    settings = ServeSettings(token=TOKEN, max_batch=args.clients, batch_wait_s=0.05, edit_on_copy=False)
    patched_app = build_app(model, tok, db, settings=settings)
    plain_app = build_app(plain_model, tok, empty, settings=settings)
    unpatch_model(plain_model)  # the same server, without the patch
    rates: dict[str, list[float]] = {"patched": [], "patched_edits_off": [], "unpatched": []}
    order = list(rates)
    with serving_port(patched_app) as patched_port, serving_port(plain_app) as plain_port:
        where = {
            "patched": (patched_port, True),
            "patched_edits_off": (patched_port, False),
            "unpatched": (plain_port, True),
        }
        one_round(patched_port, args.clients, 1, 4, True)  # warm-up, not timed
        one_round(plain_port, args.clients, 1, 4, True)
        for r in range(args.throughput_rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                port, edits = where[name]
                tokens, wall = one_round(port, args.clients, args.requests, args.max_tokens, edits)
                rates[name].append(tokens / wall)
                print(
                    f"round {r}: {name:18s} {tokens} tokens in {wall:6.2f} s = {tokens / wall:7.1f} tokens/s",
                    flush=True,
                )
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "model": args.model,
        "facts": len(db),
        "facts_kind": "random unit keys and random residuals (they never open the gate: the scan's cost only)",
        "clients": args.clients,
        "requests_per_client_per_round": args.requests,
        "max_tokens": args.max_tokens,
        "rounds": args.throughput_rounds,
        "tokens_per_s": rates,
        "median_tokens_per_s": med,
        "ratio_patched_over_unpatched": med["patched"] / med["unpatched"],
        "ratio_edits_off_over_unpatched": med["patched_edits_off"] / med["unpatched"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kill-trials", type=int, default=20)
    p.add_argument("--kill-window", type=float, nargs=2, default=(0.2, 3.0), metavar=("FROM", "TO"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--throughput-rounds", type=int, default=4, help="rounds per variant (0: no throughput run)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--facts", type=int, default=10_000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=2, help="completions per client per round")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, help="torch threads in this process (the kill trials' servers use 1)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "serve" / "bench_serve.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {"machine": machine_description("cpu"), "argv": sys.argv[1:]}
    if args.kill_trials:
        result["kill"] = kill_trials(args.kill_trials, tuple(args.kill_window), args.seed)
        k = result["kill"]
        print(
            f"kill -9: {len(k['trials'])} trials, {k['acknowledged_adds']} adds and {k['acknowledged_deletes']} "
            f"deletes acknowledged, {k['lost']} acknowledged facts lost, {k['corrupt_files']} corrupt files"
        )
    if args.throughput_rounds:
        result["throughput"] = t = throughput(args)
        print(
            f"throughput ({t['clients']} clients, {t['facts']} facts): patched / unpatched = "
            f"{t['ratio_patched_over_unpatched']:.3f}, edits off / unpatched = {t['ratio_edits_off_over_unpatched']:.3f}"
        )
    result["machine"]["load_average_after"] = machine_description("cpu")["load_average_1_5_15"]
    write_json(args.out, result)
    print(f"wrote {args.out}")
    failed = "kill" in result and (result["kill"]["lost"] or result["kill"]["corrupt_files"])
    failed = failed or any(t["resurrected"] for t in result.get("kill", {}).get("trials", []))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
