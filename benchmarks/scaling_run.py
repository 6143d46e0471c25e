"""The scaling run: every CounterFact fact (or every zsRE fact) edited into SmolLM2, evaluated at growing database sizes.

    nohup nice -n 19 python benchmarks/scaling_run.py --dataset counterfact --threads 2 > /tmp/scaling.log 2>&1 &
    python benchmarks/scaling_run.py --dataset zsre --threads 2          # the same for the ~3.3k zsRE facts
    python benchmarks/scaling_run.py --dataset counterfact --report-only # table + plot from the JSON written so far

One fixed order of facts: a seeded sample of the evaluation records first (CounterFact: ROME-format records, which
carry two paraphrases and ten neighborhood prompts; zsRE: the MEND eval records), then every other fact in a seeded
shuffle. They are edited as one checkpointed job (neuraldb.editing.edit_checkpointed) into
``runs/scaling-<dataset>/db.safetensors``; at each size n (1k, 2k, 5k, 10k, all) the first n rows of the database are
patched in and the sample (edited from the start, so the same facts at every size) is scored with neuraldb's
CounterFact/zsRE metrics, plus WikiText-2 perplexity and a few general-ability tasks. One JSON per size under
``docs/results/scaling/<dataset>/``, then ``table.md`` and ``scaling.png`` there.

Everything resumes: rerunning the same command continues the editing job at its last checkpoint (every
``--checkpoint-every`` facts) and evaluates only the sizes without a JSON. Progress lines (facts/s, ETA) go to stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "python")]

from neuraldb import facts as facts_mod
from neuraldb import templates
from neuraldb.database import NeuralKVDatabase
from neuraldb.editing import edit_checkpointed, job_record
from neuraldb.evaluation.counterfact import evaluate_counterfact
from neuraldb.evaluation.general import evaluate_general
from neuraldb.evaluation.pipeline import select_facts
from neuraldb.evaluation.zsre import evaluate_zsre

DATA = ROOT.parent / "shared" / "data"
SOURCES = {
    "counterfact": {
        "sample": "counterfact_rome_format_1031.json.gz",
        "all": ["counterfact_mend_edit.json.gz", "counterfact_mend_val.json.gz", "counterfact_mend_train.json.gz"],
        "sizes": [1000, 2000, 5000, 10000, None],
    },
    "zsre": {
        "sample": "zsre_mend_eval_portability_1037.json.gz",
        "all": [
            "zsre_mend_eval_portability_1037.json.gz",
            "zsre_mend_train_1k.json.gz",
            "zsre_knowedit_test_all_1301.json.gz",
        ],
        "sizes": [1000, 2000, None],
    },
}
METRICS = ("efficacy", "generalization", "specificity")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _key(f) -> tuple:
    return (f.subject, f.prompt, f.target_new)


def build_facts(dataset: str, data_dir: Path, sample: int, seed: int) -> tuple[list, int]:
    """(facts in the run's fixed order, how many of the first ones are the evaluation sample)."""
    src = SOURCES[dataset]
    kd = data_dir / "knowledge_editing"
    pool = facts_mod.load(kd / src["sample"])
    if dataset == "zsre":
        pool = select_facts(pool, "zsre", n_facts=None)
    chosen = [pool[i] for i in random.Random(seed).sample(range(len(pool)), sample)]
    everything = [f for name in src["all"] for f in facts_mod.load(kd / name)]
    if dataset == "zsre":
        everything = select_facts(everything, "zsre", n_facts=None)
        # the same question can sit in two files; one edit per (subject, prompt, target)
        seen = {_key(f) for f in chosen}
        rest = []
        for f in everything:
            if _key(f) not in seen:
                seen.add(_key(f))
                rest.append(f)
    else:
        # The ROME-format records are CounterFact facts with the same case_id (and rewrite) as a MEND record:
        # the sampled ones are edited in their ROME form, every other case once in its MEND form.
        taken = {f.extras["case_id"] for f in chosen}
        rest = [f for f in everything if f.extras["case_id"] not in taken]
        assert len({f.extras["case_id"] for f in everything}) == len(everything) == 21919, len(everything)
    random.Random(seed + 1).shuffle(rest)
    return chosen + rest, len(chosen)


def first_rows(db: NeuralKVDatabase, n: int) -> NeuralKVDatabase:
    """A database of the first ``n`` facts of ``db`` (ids 0..n-1), without thresholds or relation keys (those were
    fitted among all rows)."""
    if db.ids()[:n] != list(range(n)):
        raise RuntimeError(f"the database's first {n} rows are not facts 0..{n - 1}")
    return NeuralKVDatabase.from_state(db.state().select_rows(range(n)).replace(thresholds=None, relation_keys=None))


class Run:
    def __init__(self, args: argparse.Namespace, model, tok, facts: list, n_sample: int) -> None:
        self.args, self.model, self.tok, self.facts, self.n_sample = args, model, tok, facts, n_sample
        self.sample = facts[:n_sample]
        self.sizes = sorted({len(facts) if s is None else min(s, len(facts)) for s in args.sizes_resolved})
        self.out = args.results
        self.template = templates.default_template(tok)

    def prompt_fn(self, s: str) -> str:
        return templates.apply(self.template, s)

    def path(self, n: int) -> Path:
        return self.out / f"n{n:05d}.json"

    def knowledge(self) -> dict:
        if self.args.dataset == "counterfact":
            res = evaluate_counterfact(
                self.model, self.tok, self.sample, prompt_fn=self.prompt_fn, fluency=False, show_progress=False,
                batch_size=self.args.batch_size,
            )  # fmt: skip
        else:
            res = evaluate_zsre(
                self.model, self.tok, self.sample, prompt_fn=self.prompt_fn, show_progress=False,
                batch_size=self.args.batch_size,
            )  # fmt: skip
        return res["summary"]

    def general(self) -> dict:
        if self.args.no_general:
            return {}
        res = evaluate_general(
            self.model, self.tok, self.args.data / "general_eval", tasks=self.args.general_tasks,
            limit=self.args.general_limit, wikitext_max_tokens=self.args.wikitext_tokens, seed=self.args.seed,
            batch_size=max(1, self.args.batch_size // 2), show_progress=False, prompt_fn=self.prompt_fn,
        )  # fmt: skip
        return {t: r["value"] for t, r in res["tasks"].items()} | {"_limit": res["limit"]}

    def baseline(self) -> dict:
        path = self.out / "n00000.json"
        if path.exists():
            return json.loads(path.read_text())
        t0 = time.perf_counter()
        log(f"unedited model: scoring the {self.n_sample} sampled facts and general ability")
        result = {"n_edited": 0, **self._common(), "knowledge": self.knowledge(), "general": self.general()}
        result["seconds"] = time.perf_counter() - t0
        write_json(path, result)
        return result

    def _common(self) -> dict:
        a = self.args
        return {
            "dataset": a.dataset, "model": a.model, "n_evaluated": self.n_sample, "n_facts_total": len(self.facts),
            "seed": a.seed, "general_tasks": a.general_tasks, "general_limit": a.general_limit,
            "wikitext_tokens": a.wikitext_tokens, "threads": torch.get_num_threads(), "command": a.command,
        }  # fmt: skip

    def evaluate_due(self, db: NeuralKVDatabase, done: int) -> None:
        from neuraldb.patching import patch_model, unpatch_model

        for n in self.sizes:
            if n > done or self.path(n).exists():
                continue
            t0 = time.perf_counter()
            log(f"evaluating the first {n} facts")
            patch_model(self.model, first_rows(db, n))
            try:
                result = {"n_edited": n, **self._common(), "knowledge": self.knowledge(), "general": self.general()}
            finally:
                unpatch_model(self.model)
            result |= {"layer": db.layer, "gamma": db.gamma, "edit_config": {
                k: v for k, v in db.config.items() if k != "edit_job"
            }, "seconds": time.perf_counter() - t0}  # fmt: skip
            write_json(self.path(n), result)
            k = result["knowledge"]
            log(f"n={n}: " + ", ".join(f"{m} {k[m]:.1f}" for m in METRICS) + f" ({result['seconds']:.0f} s)")
            write_report(self.out, self.args.dataset)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def write_report(out: Path, dataset: str) -> None:
    """table.md and scaling.png from the JSON files in ``out`` (the sizes done so far)."""
    rows = sorted((json.loads(p.read_text()) for p in out.glob("n*.json")), key=lambda r: r["n_edited"])
    if not rows:
        return
    tasks = sorted({t for r in rows for t in r["general"] if not t.startswith("_")} - {"wikitext2"})
    head = ["edited facts", *METRICS, "score", "WikiText-2 ppl", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        k, g = r["knowledge"], r["general"]
        cells = [f"{r['n_edited']:,}" if r["n_edited"] else "0 (unedited)"]
        cells += [f"{k.get(m):.1f}" if k.get(m) is not None else "" for m in (*METRICS, "score")]
        cells += [f"{g['wikitext2']:.2f}" if g.get("wikitext2") is not None else ""]
        cells += [f"{g[t]:.1f}" if g.get(t) is not None else "" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    last = rows[-1]
    note = (
        f"\n{dataset}: {last['n_evaluated']} sampled facts scored at every size (edited first, so they are in every "
        f"prefix of the database); general tasks on {last.get('general_limit')} examples each, WikiText-2 on the first "
        f"{last.get('wikitext_tokens')} tokens. Command: `{last.get('command')}`\n"
    )
    (out / "table.md").write_text("\n".join(lines) + "\n" + note)
    try:
        from neuraldb.evaluation.plots import _pyplot, facts_axis, legend_outside, save_figure, value_axis

        plt = _pyplot()
    except ImportError:
        return
    edited = [r for r in rows if r["n_edited"]]
    if not edited:
        return
    base = rows[0] if rows[0]["n_edited"] == 0 else None
    xs = [r["n_edited"] for r in edited]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    ys = []
    for i, m in enumerate(METRICS):
        vals = [r["knowledge"].get(m) for r in edited]
        ax1.plot(xs, vals, marker="o", color=f"C{i}", label=m)
        ys += vals
        if base is not None and base["knowledge"].get(m) is not None:
            ax1.axhline(base["knowledge"][m], color=f"C{i}", linestyle=":", linewidth=1, label=f"{m}, unedited")
            ys.append(base["knowledge"][m])
    facts_axis(ax1, xs)
    value_axis(ax1, ys)
    ax1.set_title(f"{dataset}: {last['n_evaluated']} sampled facts, one database growing", fontsize=10)
    legend_outside(ax1)
    ppl = [r["general"].get("wikitext2") for r in edited]
    if any(p is not None for p in ppl):
        ax2.plot(xs, ppl, marker="o", color="C3", label="edited")
        ys = [p for p in ppl if p is not None]
        if base is not None and base["general"].get("wikitext2") is not None:
            ax2.axhline(base["general"]["wikitext2"], color="grey", linestyle=":", label="unedited")
            ys.append(base["general"]["wikitext2"])
        facts_axis(ax2, xs)
        value_axis(ax2, ys, "token perplexity", bounds=None)
        ax2.set_title("WikiText-2", fontsize=10)
        legend_outside(ax2)
    else:
        ax2.set_visible(False)
    fig.tight_layout()
    save_figure(fig, out / "scaling.png")


def add_evaluation_args(p: argparse.ArgumentParser) -> None:
    """The options :class:`Run` reads: which facts are scored and how (shared by the runs built on this one)."""
    p.add_argument("--sample", type=int, default=200, help="facts scored at every size (default 200)")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    p.add_argument("--general-tasks", nargs="+", default=["wikitext2", "lambada_openai", "arc_easy", "piqa"])
    p.add_argument("--general-limit", type=int, default=200, help="examples per general task")
    p.add_argument("--wikitext-tokens", type=int, default=16384, help="WikiText-2 tokens scored")
    p.add_argument("--no-general", action="store_true")
    p.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=tuple(SOURCES), default="counterfact")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", type=Path, default=DATA, help="the shared data folder (knowledge_editing/, general_eval/)")
    p.add_argument("--work", type=Path, help="checkpoints (default runs/scaling-<dataset>; gitignored)")
    p.add_argument("--results", type=Path, help="JSON, table and plot (default docs/results/scaling/<dataset>)")
    p.add_argument("--sizes", type=int, nargs="+", help="database sizes to evaluate (default 1k 2k 5k 10k all)")
    p.add_argument("--limit", type=int, help="edit only the first N facts of the order (a short trial run)")
    p.add_argument("--checkpoint-every", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    add_evaluation_args(p)
    p.add_argument("--report-only", action="store_true", help="only rewrite table.md and scaling.png")
    args = p.parse_args(argv)
    args.command = "python benchmarks/scaling_run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    args.work = args.work or ROOT / "runs" / f"scaling-{args.dataset}"
    args.results = args.results or ROOT / "docs" / "results" / "scaling" / args.dataset
    args.sizes_resolved = args.sizes or SOURCES[args.dataset]["sizes"]
    if args.report_only:
        write_report(args.results, args.dataset)
        return 0
    torch.set_num_threads(args.threads)
    facts, n_sample = build_facts(args.dataset, args.data, args.sample, args.seed)
    if args.limit:
        facts = facts[: args.limit]
    log(f"{args.dataset}: {len(facts)} facts, the first {n_sample} are the evaluation sample")

    import neuraldb

    model, tok = neuraldb.load_model(args.model)
    run = Run(args, model, tok, facts, n_sample)
    run.baseline()
    args.work.mkdir(parents=True, exist_ok=True)
    db_path = args.work / "db.safetensors"
    done = 0
    if db_path.exists():
        db = NeuralKVDatabase.load(db_path)
        done = job_record(db)["done"]
        log(f"resuming {db_path} at fact {done}")
        run.evaluate_due(db, done)
        del db
    # editing time and CPU time only: the evaluations between chunks are not counted in the rate
    state = {"t": time.perf_counter(), "cpu": time.process_time(), "last": done, "edit_s": 0.0, "edit_n": 0}

    def flushed(db: NeuralKVDatabase, done: int) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        chunk = done - state["last"]
        state["edit_s"] += now - state["t"]
        state["edit_n"] += chunk
        overall = state["edit_n"] / state["edit_s"]
        log(
            f"{done}/{len(facts)} facts saved; {chunk / (now - state['t']):.3f} facts/s in this chunk "
            f"({(cpu - state['cpu']) / chunk:.2f} CPU-s/fact), {overall:.3f} facts/s in this process; "
            f"ETA of the editing {(len(facts) - done) / overall / 3600:.1f} h"
        )
        state["last"] = done
        run.evaluate_due(db, done)
        state["t"], state["cpu"] = time.perf_counter(), time.process_time()

    db = edit_checkpointed(
        model, tok, facts, db_path, checkpoint_every=args.checkpoint_every, resume=True, progress=False,
        on_flush=flushed, source={"run": f"scaling_run.py --dataset {args.dataset} --seed {args.seed}"},
    )  # fmt: skip
    run.evaluate_due(db, len(facts))
    write_report(args.results, args.dataset)
    log(f"done: {len(db)} facts in {db_path}; results in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
