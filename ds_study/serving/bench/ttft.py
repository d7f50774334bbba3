"""TTFT measurements of the reference engine on one model pair (paper Fig. 13, 14, 20), on CPU.

``scripts/bench_ttft.py`` is their command line; each function here takes its parsed arguments
(``args``: receiver, sender, receiver_b, task, examples, reps, plans, plan, gbps, sweep, latency_ms,
chunk_bytes, loader, random, random_tokens, out) and writes its result files under ``out_dir``
(default results/engine), which ``ds_study.figures`` draws:

- ``quality``: TTFT vs quality per plan and strategy (Fig. 14);
- ``bandwidth``: TTFT vs link bandwidth, strategies a/b/c and full prefill (Fig. 20);
- ``timeline``: Fig. 13's two receivers, unit-cost simulation and a measured run;
- ``spans``: where the time of one pipelined request goes, layer by layer.

Every TTFT is the median of measured repetitions after a warm-up; next to the pipelined TTFT
stands the lower bound max(compute, load): *compute* is the same request with every item already
delivered (recompute + final pass, measured in the same run, ``all_delivered``), *load* is the
link's analytic time for the bytes the pipelined strategy sends (``load_seconds``). The link is
paced in software (sleeps against absolute deadlines), so "bandwidth" means the Link's setting, not
a NIC's. The pair is the embedded one (``load_setup``) or, clearly labelled, random-weight models of
the zoo's shape (timing only).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ds_study.executor import capture
from ds_study.link import Link
from ds_study.records import bench_environment, write_csv, write_json, write_jsonl
from ds_study.runner import REPO_ROOT, prepare
from ds_study.serving.arrivals import Arrivals
from ds_study.serving.engine import Engine
from ds_study.serving.execute import execute
from ds_study.serving.rules import check_request, transfer_items
from ds_study.serving.simulate import SimJob, simulate
from ds_study.serving.store import KVStore, context_hash, entry_key, model_identity, publish
from ds_study.serving.timeline import Request, sum_ttft

RESULTS = REPO_ROOT / "results" / "engine"
DEFAULT_PLANS = ["full_reuse", "6-7", "4-5", "2-3", "0-1", "4-7", "2-5", "0-3", "2-7", "0-5", "full_prefill"]


# --------------------------------------------------------------------------------------------
# Setup


@dataclass
class Setup:
    receiver: torch.nn.Module
    sender: torch.nn.Module
    rid: str
    sid: str
    label: str
    prompts: list  # ds_study.data.Prompt
    records: list
    task: object
    tokenizer: object
    store: KVStore
    eos: int | None
    identities: dict
    loader: str = "auto"  # Engine(loader=...): what moves the items
    loaders_used: set = field(default_factory=set)  # what did, as the results report it


def zoo_available() -> bool:
    from ds_study.zoo import MANIFEST, ZOO_DIR

    return (ZOO_DIR / MANIFEST).exists()


def load_setup(args) -> Setup:
    """The embedded pair and task prompts, or (clearly labelled) random-weight models of the same shape."""
    store = KVStore()
    needs_zoo = any(ref.startswith("zoo:") for ref in (args.receiver, args.sender))
    if not args.random and (zoo_available() or not needs_zoo):
        from ds_study.data import TASKS, load_records
        from ds_study.pair import load_pair

        pair = load_pair(args.receiver, args.sender)
        task = TASKS[args.task]
        records = load_records(args.task, "test", limit=args.examples)
        prompts = [ex.prompt for ex in prepare(pair, task, records, pair.receiver.config.max_position_embeddings)]
        rid, sid = model_identity(pair.receiver_id), model_identity(pair.sender_id)
        s = Setup(pair.receiver, pair.sender, rid, sid, f"{args.receiver} <- {args.sender}", prompts, records, task,
                  pair.tokenizer, store, pair.tokenizer.eos_token_id, pair.identities())
    else:
        import transformers as tf
        from omegaconf import OmegaConf

        from ds_study.data import Prompt
        from ds_study.zoo import CONF_DIR

        shape = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "zoo.yaml").model)  # the zoo's recipe shape
        cfg = tf.LlamaConfig(vocab_size=4096, attn_implementation="sdpa", **shape)
        models = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            models.append(tf.AutoModelForCausalLM.from_config(cfg).eval())
        g = torch.Generator().manual_seed(0)
        prompts = [Prompt(torch.randint(3, 4096, (args.random_tokens,), generator=g).tolist(),
                          torch.randint(3, 4096, (16,), generator=g).tolist(), "", "") for _ in range(args.examples)]
        ids = {"receiver": {"name": "random seed 0"}, "sender": {"name": "random seed 1"}}
        s = Setup(models[0], models[1], "random-receiver", "random-sender",
                  "RANDOM-WEIGHT Llama, zoo recipe shape (zoo not built): timing only, no quality", prompts,
                  [], None, None, store, None, ids)
    for p in s.prompts:
        publish(store, capture(s.sender, p.prefix_ids), s.sid, s.rid)
    s.loader = args.loader
    return s


def link_record(args, S: Setup) -> dict:
    """The link's settings and what moved the items over it, for the result files."""
    return {"gbps": args.gbps, "latency_ms": args.latency_ms, "chunk_bytes": args.chunk_bytes,
            "loader": args.loader, "loaders_used": sorted(S.loaders_used - {"none"})}


def request(S: Setup, i: int, plan, max_new: int = 1, name: str | None = None) -> Request:
    p = S.prompts[i]
    return Request(name or f"ex{i}", S.receiver, S.rid, S.sid, plan, p.prefix_ids, p.suffix_ids, max_new, S.eos)


def run(S: Setup, i: int, plan, strategy: str, link: Link, max_new: int = 1):
    (res,) = Engine(S.store, link, timeout_s=120, loader=S.loader).run([request(S, i, plan, max_new)], strategy)
    S.loaders_used.add(res.loader or "none")
    if res.fallback:
        raise RuntimeError(f"unexpected fallback in a benchmark run: {res.reason}")
    return res


def compute_only(S: Setup, i: int, plan) -> float:
    """TTFT of the same request with every item delivered before it starts: recompute + final pass."""
    return all_delivered(S, i, plan).ttft


def all_delivered(S: Setup, i: int, plan):
    """The request run with every item it would load already delivered (its result, spans included)."""
    n = S.receiver.config.num_hidden_layers
    strategy, plan = check_request("full_prefill" if plan == "full_prefill" else "pipelined", plan, n)
    items = transfer_items(strategy, plan, n)
    arr = Arrivals(items, 0.0)
    ctx = context_hash(S.prompts[i].prefix_ids)
    for it in items:
        arr.deliver(it, tuple(S.store.get(entry_key(S.sid, S.rid, ctx, it.layer, k)) for k in it.entry_kinds()), 0, 0)
    arr.t0 = time.perf_counter()
    return execute(request(S, i, plan), strategy, plan, arr, 120)


def load_seconds(S: Setup, i: int, plan, strategy: str, link: Link) -> tuple[float, int, float]:
    """The link's analytic time for what ``strategy`` sends under ``plan``, the bytes, and the time of
    the E items alone (which an E-first schedule must wait for before recomputing)."""
    n = S.receiver.config.num_hidden_layers
    strategy, plan = check_request(strategy, plan, n)
    ctx = context_hash(S.prompts[i].prefix_ids)
    secs, total, e_secs = 0.0, 0, 0.0
    for it in transfer_items(strategy, plan, n):
        b = sum(S.store.nbytes(entry_key(S.sid, S.rid, ctx, it.layer, k)) for k in it.entry_kinds())
        secs, total = secs + link.seconds(b), total + b
        e_secs += link.seconds(b) if it.kind == "e" else 0.0
    return secs, total, e_secs


def strategies_for(plan: str) -> list[str]:
    if plan == "full_prefill":
        return ["full_prefill"]
    if plan == "full_reuse":
        return ["full_reuse"]
    return ["pipelined", "send_reused", "send_all"]


def median(xs):
    return statistics.median(xs) if xs else None


# --------------------------------------------------------------------------------------------
# TTFT vs quality (Fig. 14)


def quality(args, out_dir: Path = RESULTS) -> dict:
    from ds_study.metrics import aggregate, get_metric, metric_versions, score_example

    S = load_setup(args)
    if S.task is None:
        sys.exit("quality needs the embedded zoo pair (ds_study/assets/zoo); it is not built yet")
    env = bench_environment()
    link = Link(args.gbps, args.latency_ms / 1e3, args.chunk_bytes)
    metric = get_metric(S.task.metric)
    plans = args.plans.split(";") if args.plans else DEFAULT_PLANS
    for plan in plans:  # warm-up, not recorded
        for strategy in strategies_for(plan):
            run(S, 0, plan, strategy, link)
        compute_only(S, 0, plan)
    rows, samples = [], []
    for i, p in enumerate(S.prompts):
        for plan in plans:
            strategies = strategies_for(plan)
            comps, ttfts, firsts, answer_tokens = [], {s: [] for s in strategies}, {}, None
            for r in range(args.reps):  # interleaved, so every series sees the same background load
                comps.append(compute_only(S, i, plan))
                for strategy in strategies:
                    answering = r == 0 and strategy == strategies[0]
                    res = run(S, i, plan, strategy, link, S.task.max_new_tokens if answering else 1)
                    ttfts[strategy].append(res.ttft)
                    firsts[strategy] = res.token_ids[:1]
                    if answering:
                        answer_tokens = res.token_ids
            comp = median(comps)
            for strategy in strategies:
                load_s, nbytes, e_s = load_seconds(S, i, plan, strategy, link)
                n_rec = check_request(strategy, plan, S.receiver.config.num_hidden_layers)[1].n_recomputed()
                ts = ttfts[strategy]
                row = {"example": i, "n_prefix": p.n_prefix, "plan": plan, "n_recomputed": n_rec,
                       "strategy": strategy, "ttft_ms": 1e3 * median(ts), "ttft_ms_reps": [1e3 * t for t in ts],
                       "compute_ms": 1e3 * comp, "compute_ms_reps": [1e3 * t for t in comps],
                       "load_ms": 1e3 * load_s, "bytes_sent": nbytes,
                       "first_token": firsts[strategy][0] if firsts[strategy] else None}
                row["bound_ms"] = max(row["compute_ms"], row["load_ms"])
                row["e_first_bound_ms"] = max(1e3 * e_s + row["compute_ms"], row["load_ms"])
                row["serial_ms"] = row["compute_ms"] + row["load_ms"]
                row["ratio_to_bound"] = row["ttft_ms"] / row["bound_ms"]
                rows.append(row)
            text = S.tokenizer.decode(answer_tokens, skip_special_tokens=True)
            score = score_example(text, S.records[i]["answers"], metric)
            samples.append({"example": i, "_id": S.records[i]["_id"], "plan": plan, "prediction": text,
                            "answers": S.records[i]["answers"], "score": score})
            for row in rows[-len(strategies_for(plan)):]:
                row["score"] = score
        print(f"example {i + 1}/{len(S.prompts)} done", flush=True)
    summary = []
    for plan in plans:
        scores = [s["score"] for s in samples if s["plan"] == plan]
        for strategy in strategies_for(plan):
            rs = [r for r in rows if r["plan"] == plan and r["strategy"] == strategy]
            ref_first = {r["example"]: r["first_token"] for r in rows if r["plan"] == plan
                         and r["strategy"] == strategies_for(plan)[0]}
            summary.append({"plan": plan, "strategy": strategy, "n_recomputed": rs[0]["n_recomputed"],
                            "quality": aggregate(scores), "ttft_ms": median([r["ttft_ms"] for r in rs]),
                            "compute_ms": median([r["compute_ms"] for r in rs]),
                            "load_ms": median([r["load_ms"] for r in rs]),
                            "bound_ms": median([r["bound_ms"] for r in rs]),
                            "e_first_bound_ms": median([r["e_first_bound_ms"] for r in rs]),
                            "ratio_to_bound": median([r["ratio_to_bound"] for r in rs]),
                            "ratio_to_e_first_bound": median([r["ttft_ms"] / r["e_first_bound_ms"] for r in rs]),
                            "max_ratio_to_bound": max(r["ratio_to_bound"] for r in rs),
                            "first_token_agrees": all(r["first_token"] == ref_first[r["example"]] for r in rs)})
    full = next(s["ttft_ms"] for s in summary if s["plan"] == "full_prefill") if "full_prefill" in plans else None
    for s in summary:
        s["speedup_vs_full_prefill"] = full / s["ttft_ms"] if full else None
    env["loadavg_end"] = os.getloadavg()
    name = args.out or "ttft_quality"
    result = {
        "what": "TTFT vs quality per plan and strategy (paper Fig. 14) on CPU", "pair": S.label,
        "identities": S.identities, "task": S.task.name, "metric": S.task.metric,
        "metric_versions": metric_versions([S.task.metric]), "n_examples": len(S.prompts),
        "n_prefix_tokens": [p.n_prefix for p in S.prompts], "reps": args.reps,
        "link": link_record(args, S),
        "bound": "max(compute_ms, load_ms); compute = same request with all items pre-delivered, "
                 "load = link time of the bytes the strategy sends; e_first_bound = max(load of E + compute, load)",
        "environment": env,
        "summary": summary, "rows": rows}
    write_json(Path(out_dir) / f"{name}.json", result)
    write_csv(Path(out_dir) / f"{name}_summary.csv", summary)
    write_jsonl(Path(out_dir) / f"{name}_samples.jsonl", samples)
    print(f"{'plan':>12} {'strategy':>12} {'quality':>8} {'ttft':>8} {'bound':>8} {'ratio':>6} {'E-1st':>6} "
          f"{'speedup':>7}")
    for s in summary:
        print(f"{s['plan']:>12} {s['strategy']:>12} {s['quality']:8.2f} {s['ttft_ms']:8.2f} {s['bound_ms']:8.2f} "
              f"{s['ratio_to_bound']:6.3f} {s['ratio_to_e_first_bound']:6.3f} {s['speedup_vs_full_prefill'] or 0:7.2f}")
    return result


# --------------------------------------------------------------------------------------------
# TTFT vs bandwidth (Fig. 20)


def bandwidth(args, out_dir: Path = RESULTS) -> dict:
    S = load_setup(args)
    env = bench_environment()
    bws = [float(x) for x in args.sweep.split(",")]
    strategies = ["full_prefill", "send_all", "send_reused", "pipelined"]
    examples = range(len(S.prompts))
    for strategy in strategies:  # warm-up
        run(S, 0, args.plan, strategy, Link(bws[-1]))
    rows = []
    for gbps in bws:
        link = Link(gbps, args.latency_ms / 1e3, args.chunk_bytes)
        for i in examples:
            comps, ttfts = [], {s: [] for s in strategies}
            for _ in range(args.reps):  # interleaved, so every series sees the same background load
                comps.append(compute_only(S, i, args.plan))
                for strategy in strategies:
                    ttfts[strategy].append(run(S, i, args.plan, strategy, link).ttft)
            comp = median(comps)
            for strategy in strategies:
                load_s, nbytes, e_s = load_seconds(S, i, args.plan, strategy, link)
                c = comp if strategy != "full_prefill" else None
                ts = ttfts[strategy]
                rows.append({"gbps": gbps, "example": i, "n_prefix": S.prompts[i].n_prefix, "strategy": strategy,
                             "ttft_ms": 1e3 * median(ts), "ttft_ms_reps": [1e3 * t for t in ts],
                             "load_ms": 1e3 * load_s, "bytes_sent": nbytes,
                             "compute_ms": 1e3 * c if c is not None else None,
                             "bound_ms": 1e3 * max(c, load_s) if c is not None else None,
                             "e_first_bound_ms": 1e3 * max(e_s + c, load_s) if c is not None else None})
        print(f"{gbps:g} Gbit/s done", flush=True)
    summary = []
    for gbps in bws:
        for strategy in strategies:
            rs = [r for r in rows if r["gbps"] == gbps and r["strategy"] == strategy]
            s = {"gbps": gbps, "strategy": strategy, "ttft_ms": median([r["ttft_ms"] for r in rs]),
                 "load_ms": median([r["load_ms"] for r in rs]), "bytes_sent": median([r["bytes_sent"] for r in rs])}
            if strategy != "full_prefill":
                s["bound_ms"] = median([r["bound_ms"] for r in rs])
                s["e_first_bound_ms"] = median([r["e_first_bound_ms"] for r in rs])
                s["ratio_to_bound"] = median([r["ttft_ms"] / r["bound_ms"] for r in rs])
                s["ratio_to_e_first_bound"] = median([r["ttft_ms"] / r["e_first_bound_ms"] for r in rs])
            summary.append(s)
    full = median([r["ttft_ms"] for r in rows if r["strategy"] == "full_prefill"])
    sent = median([r["bytes_sent"] for r in rows if r["strategy"] == "pipelined"])
    crossover = sent * 8 / (full / 1e3) / 1e9  # link speed at which loading what (b)/(c) send = a full prefill
    env["loadavg_end"] = os.getloadavg()
    name = args.out or "ttft_bandwidth"
    result = {
        "what": "TTFT vs link bandwidth (paper Fig. 20) on CPU", "pair": S.label, "identities": S.identities,
        "plan": args.plan, "n_examples": len(S.prompts), "n_prefix_tokens": [p.n_prefix for p in S.prompts],
        "reps": args.reps, "link": {k: v for k, v in link_record(args, S).items() if k != "gbps"},
        "full_prefill_ms": full, "crossover_gbps": crossover,
        "crossover": "bandwidth at which loading what (b)/(c) send takes as long as the median full prefill",
        "sweep_spans_crossover": min(bws) < crossover < max(bws), "environment": env,
        "summary": summary, "rows": rows}
    write_json(Path(out_dir) / f"{name}.json", result)
    write_csv(Path(out_dir) / f"{name}_summary.csv", summary)
    print(f"full prefill {full:.2f} ms; crossover at {crossover:.3g} Gbit/s")
    for s in summary:
        extra = (f" bound {s['bound_ms']:.2f} ratio {s['ratio_to_bound']:.3f} (E-first bound "
                 f"{s['e_first_bound_ms']:.2f}, ratio {s['ratio_to_e_first_bound']:.3f})") if "bound_ms" in s else ""
        print(f"{s['gbps']:>8g} {s['strategy']:>12} {s['ttft_ms']:8.2f} ms{extra}")
    return result


# --------------------------------------------------------------------------------------------
# Fig. 13 timeline


def timeline(args, out_dir: Path = RESULTS) -> dict:
    env = bench_environment()
    jobs = [SimJob("A", 10, "3-9", 0), SimJob("B", 10, "0-2", 2)]
    sim = {}
    for strategy in ("send_all", "send_reused", "pipelined"):
        res = simulate(jobs, strategy)
        sim[strategy] = {"sum_ttft": sum_ttft(res), "results": [r.to_json() for r in res]}
        print(f"simulated {strategy:>12}: TTFT {[r.ttft for r in res]} sum {sum_ttft(res)}")
    out = {"what": "Fig. 13: two receivers A (recompute L4-L10) and B (recompute L1-L3), B arrives at t=2",
           "simulated_unit_cost": sim, "environment": env}
    S = load_setup(args)
    if S.task is not None:
        from ds_study.pair import load_pair

        other = load_pair(args.receiver_b, args.sender)
        rid_b = model_identity(other.receiver_id)
        for p in S.prompts[:1]:
            publish(S.store, capture(S.sender, p.prefix_ids), S.sid, rid_b)
        model_b = other.receiver
    else:
        import transformers as tf

        torch.manual_seed(2)
        model_b, rid_b = tf.AutoModelForCausalLM.from_config(S.receiver.config).eval(), "random-receiver-b"
        publish(S.store, capture(S.sender, S.prompts[0].prefix_ids), S.sid, rid_b)
    n = S.receiver.config.num_hidden_layers
    a_plan, b_plan = f"{n - 5}-{n - 1}", "0-2"  # A recomputes its last layers, B its first three
    full = median([compute_only(S, 0, "full_prefill") for _ in range(args.reps)])
    unit = full / n  # one layer's computation on this machine
    kv_bytes = load_seconds(S, 0, "full_reuse", "full_reuse", Link(1.0))[1] / n
    gbps = kv_bytes * 8 / unit / 1e9  # a link on which one layer's KV takes one layer's compute
    link = Link(gbps, 0.0, args.chunk_bytes)
    p = S.prompts[0]
    measured = {}
    for strategy in ("send_all", "send_reused", "pipelined"):
        reps = []
        for _ in range(args.reps + 1):
            reqs = [Request("A", S.receiver, S.rid, S.sid, a_plan, p.prefix_ids, p.suffix_ids, 1, S.eos, 0.0),
                    Request("B", model_b, rid_b, S.sid, b_plan, p.prefix_ids, p.suffix_ids, 1, S.eos, 2 * unit)]
            reps.append(Engine(S.store, link, timeout_s=120, loader=S.loader).run(reqs, strategy))
            S.loaders_used.update(r.loader or "none" for r in reps[-1])
        reps = reps[1:]  # the first is a warm-up
        mid = sorted(reps, key=sum_ttft)[len(reps) // 2]
        measured[strategy] = {"sum_ttft_ms": 1e3 * sum_ttft(mid), "sum_ttft_ms_reps": [1e3 * sum_ttft(r) for r in reps],
                              "results": [r.to_json() for r in mid]}
        print(f"measured  {strategy:>12}: TTFT ms {[round(1e3 * r.ttft, 1) for r in mid]} "
              f"sum {1e3 * sum_ttft(mid):.1f}")
    out["measured"] = {"pair": S.label, "receiver_b": args.receiver_b, "plans": {"A": a_plan, "B": b_plan},
                       "unit_ms": 1e3 * unit, "link_gbps": gbps, "b_arrival_ms": 2e3 * unit,
                       "link": dict(link_record(args, S), gbps=gbps, latency_ms=0.0),
                       "n_prefix": p.n_prefix, "reps": args.reps, "strategies": measured,
                       "note": "unit = median full prefill / layers; link paced so one layer's KV takes one unit "
                               "(E is 2 units on this GQA 4:1 model); the median-sum repetition is kept"}
    env["loadavg_end"] = os.getloadavg()
    write_json(Path(out_dir) / "fig13_timeline.json", out)
    return out


def spans(args, out_dir: Path = RESULTS) -> dict:
    """One example, one plan, one link: the span timeline (loads, waits, recompute and final-pass
    layers) of the median pipelined run and of the same request with everything delivered first, so
    a gap between TTFT and the bound can be traced to a phase."""
    env = bench_environment()
    S = load_setup(args)
    link = Link(args.gbps, args.latency_ms / 1e3, args.chunk_bytes)
    run(S, 0, args.plan, "pipelined", link)  # warm-up
    piped = sorted((run(S, 0, args.plan, "pipelined", link) for _ in range(args.reps)), key=lambda r: r.ttft)
    alone = sorted([all_delivered(S, 0, args.plan) for _ in range(args.reps + 1)][1:], key=lambda r: r.ttft)
    load_s, nbytes, e_s = load_seconds(S, 0, args.plan, "pipelined", link)
    out = {"what": "span timeline of one request, median of the repetitions", "pair": S.label, "plan": args.plan,
           "link": link_record(args, S),
           "load_ms": 1e3 * load_s, "e_load_ms": 1e3 * e_s, "bytes_sent": nbytes, "reps": args.reps,
           "pipelined": piped[len(piped) // 2].to_json(), "pipelined_ttft_ms_reps": [1e3 * r.ttft for r in piped],
           "all_delivered": alone[len(alone) // 2].to_json(), "all_delivered_ttft_ms_reps": [1e3 * r.ttft for r in alone],
           "environment": env}
    for name in ("pipelined", "all_delivered"):
        r = out[name]
        print(f"{name}: TTFT {r['ttft'] * 1e3:.1f} ms (load of what is sent {out['load_ms']:.1f} ms, E alone {out['e_load_ms']:.1f})")
        for sp in sorted(r["spans"], key=lambda sp: sp["start"]):
            print(f"  {sp['op']:>9} L{sp['layer']} {sp.get('kind') or '':>2} {1e3 * sp['start']:7.2f} -> {1e3 * sp['end']:7.2f} ms")
        for op in ("recompute", "final"):
            print(f"  {op} time in all: {1e3 * sum(sp['end'] - sp['start'] for sp in r['spans'] if sp['op'] == op):.1f} ms")
    env["loadavg_end"] = os.getloadavg()
    write_json(Path(out_dir) / f"{args.out or 'ttft_spans'}.json", out)
    return out


def receiver_layers(args) -> int:
    """The receiver's layer count from its config alone (what load_setup will load, without the weights)."""
    if args.random or (args.receiver.startswith("zoo:") and not zoo_available()):
        from omegaconf import OmegaConf

        from ds_study.zoo import CONF_DIR

        return int(OmegaConf.load(CONF_DIR / "zoo.yaml").model.num_hidden_layers)
    from transformers import AutoConfig

    from ds_study.pair import resolve, shape_of

    return shape_of(AutoConfig.from_pretrained(resolve(args.receiver)))["num_hidden_layers"]
