"""The serving simulator's studies (issue 16 §3): its validation against the real CPU server, the
paper's Fig. 15 at Llama-3-8B scale on H200 costs, Fig. 21's runtime adaptation, and a
bandwidth-aware policy beyond the paper.

    python -m ds_study.sim_study validate --run results/serving/smol_sum_code/cpu_sweep  # sim vs real server
    python -m ds_study.sim_study fig15                # H200 costs (results/engine/gpu_pipeline_h200.json)
    python -m ds_study.sim_study fig21 --run ...      # adaptation on the CPU costs and the study's frontier
    python -m ds_study.sim_study all --run ...

Every cost comes from a committed measurement: the CPU server's iteration log (``calibrate``: one
rate calibrates, the others validate) or the H200 engine runs (``gpu_costs``). Results go to
``results/serving/`` as JSON, which ``ds_study.figures`` draws.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ds_study.records import write_json
from ds_study.runner import REPO_ROOT
from ds_study.serving.adapt import BandwidthAwarePolicy, FixedPolicy, LoadPolicy, Point
from ds_study.serving.load_sim import Costs, calibrate, simulate_serving
from ds_study.serving.report import summarize
from ds_study.serving.workload import ServeRequest, arrival_times, paired_requests

OUT = REPO_ROOT / "results" / "serving"
GPU = REPO_ROOT / "results" / "engine" / "gpu_pipeline_h200.json"
SEARCH = REPO_ROOT / "results" / "search"


# -------------------------------------------------------------------------------- inputs


def load_run(run: Path) -> tuple[dict, dict[str, list[dict]], dict[str, list[dict]]]:
    """A serve run directory: its summary, request logs and iteration logs, keyed by "strategy@rate"."""
    run = Path(run)
    if not (run / "summary.json").exists():
        raise SystemExit(f"error: {run} is not a finished serve run (no summary.json); run python -m ds_study.serve")
    summary = json.loads((run / "summary.json").read_text())
    read = lambda p: [json.loads(line) for line in p.read_text().splitlines()]  # noqa: E731
    requests = {p.stem: read(p) for p in sorted((run / "requests").glob("*.jsonl"))}
    iterations = {p.stem: read(p) for p in sorted((run / "iterations").glob("*.jsonl"))}
    return summary, requests, iterations


def replay(log: list[dict]) -> list[ServeRequest]:
    """The workload of a request log, for the simulator (token counts stand in for token ids)."""
    return [ServeRequest(r["name"], r["role"], r["context"], list(range(r["n_prompt_tokens"])), [], r["arrival"],
                         len(r["token_times"]), r["replica"]) for r in log]


def model_bytes(pair: str) -> tuple[int, float, float]:
    """(layers, K+V bytes per token and layer, E bytes per token) of a pair's receiver, float32."""
    from transformers import AutoConfig

    from ds_study.pair import config_ref, shape_of
    from ds_study.runner import compose

    cfg = compose("serve", [f"model_pair={pair}"])
    s = shape_of(AutoConfig.from_pretrained(config_ref(cfg.model_pair.receiver)))
    return s["num_hidden_layers"], 2 * s["num_key_value_heads"] * s["head_dim"] * 4, s["hidden_size"] * 4


def gpu_costs(path: Path = GPU, link: str = "100") -> tuple[Costs, dict]:
    """H200 costs of the Llama-3-8B shape from the committed engine runs (bf16, one GPU): full prefill,
    the measured pipelined plans, per-layer recompute and final-pass times, the pipelining overhead.
    No decode step was measured there, so simulated requests ask for one token (TTFT only)."""
    d = json.loads(Path(path).read_text())
    res = [r for r in d["results"] if r["event"] == "result" and r["link"] == link]
    brk = [r for r in d["results"] if r["event"] == "breakdown"]
    toks = sorted({r["tokens"] for r in res})
    mean = lambda rows, key: [float(np.mean([r[key] for r in rows if r["tokens"] == t])) / 1e3 for t in toks]  # noqa: E731
    plans = sorted({r["plan"] for r in res})
    per_layer = [float(np.mean([r["recompute_ms"] / 4 for r in brk if r["tokens"] == t])) / 1e3 for t in toks]
    suffix = mean(brk, "suffix_graphs_ms")
    full = mean(res, "full_prefill_engine_ms")
    costs = Costs({"sender": (toks, full), "full_prefill": (toks, full), "droidspeak": (toks, mean(res, "pipelined_ms"))},
                  None, 32, (toks, per_layer), (toks, suffix), kv_bytes_per_token_layer=2 * 8 * 128 * 2,
                  e_bytes_per_token=4096 * 2, pipeline_overhead=float(np.mean([r["pipelined_over_bound"] for r in res])),
                  source=f"{Path(path).relative_to(REPO_ROOT) if Path(path).is_relative_to(REPO_ROOT) else path} "
                         f"(link {link} Gbit/s; plans {', '.join(plans)})")
    gbps = None if link == "host" else float(link)
    costs.prefill["full_reuse"] = (toks, [costs.droidspeak_s(0, t, gbps, 0) for t in toks])
    return costs, {"plans": plans, "gbps": gbps, "environment": d["environment"]}


def kl_frontier(pair: str, dataset: str) -> list[Point]:
    """Per recompute count, the plan of the exhaustive search with the lowest KL from the receiver's
    full prefill (the signal that ranks this pair's plans reliably); quality = -KL."""
    d = json.loads((SEARCH / pair / dataset / "search.json").read_text())
    best: dict[int, Point] = {}
    for name, v in d["plan_means"].items():
        if name in ("full_reuse", "full_prefill"):
            groups = [] if name == "full_reuse" else [(0, d["n_layers"] - 1)]
        elif name.startswith("groups:"):
            groups = [tuple(map(int, g.split("-"))) for g in name[7:].split(",")]
        else:
            continue
        k = sum(b - a + 1 for a, b in groups)
        p = Point(k, -float(v["kl"]), name, sum(a > 0 for a, _ in groups))
        if k not in best or p.quality > best[k].quality:
            best[k] = p
    return [best[k] for k in sorted(best)]


# -------------------------------------------------------------------------------- studies


def err(sim: float, real: float) -> float:
    return (sim - real) / real


def validate(run: Path, out: Path = OUT) -> dict:
    """Calibrate on the run's lowest rate, per strategy; simulate its other rates; compare."""
    summary, requests, iterations = load_run(run)
    n_layers, kvb, eb = model_bytes(summary["pair"])
    rates = sorted({r["rate"] for r in summary["runs"]})
    cal_rate, rows = rates[0], []
    for strategy in dict.fromkeys(r["strategy"] for r in summary["runs"]):
        costs = calibrate(iterations[f"{strategy}@{cal_rate:g}"], n_layers, kvb, eb)
        for rate in rates[1:]:
            log = requests[f"{strategy}@{rate:g}"]
            real = summarize_json(log, summary["settings"]["slo_ttft_s"])
            sim = summarize(simulate_serving(replay(log), strategy, costs, max_batch=summary["settings"]["max_batch"]),
                            summary["settings"]["slo_ttft_s"])
            row = {"strategy": strategy, "rate": rate}
            for what, get in (("ttft_mean_ms", lambda s: s["all"]["ttft_ms"]["mean"]),
                              ("receiver_ttft_mean_ms", lambda s: s["receiver"]["ttft_ms"]["mean"]),
                              ("throughput_rps", lambda s: s["all"]["request_throughput"])):
                row[f"real_{what}"], row[f"sim_{what}"] = get(real), get(sim)
                row[f"err_{what}"] = err(get(sim), get(real))
            rows.append(row)
    worst = max(abs(r[f"err_{w}"]) for r in rows for w in ("ttft_mean_ms", "throughput_rps"))
    result_caps = cpu_capacity(summary, iterations, cal_rate, n_layers, kvb, eb)
    result = {"run": str(Path(run)), "pair": summary["pair"], "calibration_rate": cal_rate,
              "validation_rates": rates[1:], "rows": rows, "max_abs_error": worst, "goal": 0.10,
              "capacity": result_caps,
              "command": f"python -m ds_study.sim_study validate --run {run}"}
    write_json(out / summary["pair"] / "sim_validation.json", result)
    return result


def cpu_capacity(summary: dict, iterations: dict, cal_rate: float, n_layers: int, kvb: float, eb: float) -> dict:
    """Per strategy, its calibrated costs and the rate at which 90% of receivers meet the SLO, simulated
    with the server's placement (one unit, both roles) and with the paper's (senders on their own unit)."""
    st = summary["settings"]
    logs = {s: iterations[f"{s}@{cal_rate:g}"] for s in dict.fromkeys(r["strategy"] for r in summary["runs"])}
    tokens = int(np.mean([it["tokens"] for its in logs.values() for it in its if it["op"] == "prefill"]))
    out = {"slo_ttft_s": st["slo_ttft_s"], "mean_prompt_tokens": tokens, "strategies": {}}
    for strategy, its in logs.items():
        c = calibrate(its, n_layers, kvb, eb)
        wl = lambda rate: paired(rate, 300, tokens, st["delay_s"], st["max_new_tokens"], 1.0, 1)  # noqa: E731
        out["strategies"][strategy] = {
            "sender_prefill_s": c.prefill_s("sender", tokens), "receiver_prefill_s": c.prefill_s(strategy, tokens),
            "decode_step_s_batch1": c.decode_s(1, tokens),
            "capacity_colocated": capacity(strategy, c, st["slo_ttft_s"], wl, max_batch=st["max_batch"]),
            "capacity_separate_sender": capacity(strategy, c, st["slo_ttft_s"], wl, max_batch=st["max_batch"],
                                                 sender_units=1)}
    base = out["strategies"].get("full_prefill")
    if base:
        for v in out["strategies"].values():
            for k in ("colocated", "separate_sender"):
                v[f"ratio_{k}"] = v[f"capacity_{k}"] / base[f"capacity_{k}"] if base[f"capacity_{k}"] else None
    return out


def summarize_json(log: list[dict], slo: float) -> dict:
    from ds_study.serving.report import RequestRecord

    fields = RequestRecord.__dataclass_fields__
    return summarize([RequestRecord(**{k: v for k, v in r.items() if k in fields}) for r in log], slo)


def receiver_workload(rate: float, n: int, tokens: int, seed: int = 0, burstiness: float = 1.0,
                      max_new_tokens: int = 1) -> list[ServeRequest]:
    """Receiver requests only: their sender caches were published beforehand on sender replicas."""
    return [ServeRequest(f"r{i}", "receiver", i, list(range(tokens)), [], t, max_new_tokens, 0)
            for i, t in enumerate(arrival_times(rate, n, burstiness, seed))]


def capacity(strategy: str, costs: Costs, slo: float, workload, attain: float = 0.9, **kw) -> float:
    """The highest rate at which ``attain`` of the receiver requests of ``workload(rate)`` meet the TTFT
    SLO in simulation (bisection; attainment falls with the rate)."""
    def ok(rate):
        recs = [r for r in simulate_serving(workload(rate), strategy, costs, **kw) if r.role == "receiver"]
        return np.mean([r.ttft <= slo for r in recs]) >= attain
    lo, hi = 0.0, 0.05
    while ok(hi):
        lo, hi = hi, hi * 2
    for _ in range(25):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def fig15(out: Path = OUT, tokens: int = 8192, units: int = 8, slo_factor: float = 2.0, link: str = "100") -> dict:
    """Paper Fig. 15 at Llama-3-8B scale: 2 nodes x 4 receiver replicas, H200 costs, TTFT vs rate and
    throughput at a TTFT SLO of ``slo_factor`` x full prefill's unloaded TTFT (before its knee)."""
    costs, meta = gpu_costs(link=link)
    slo = slo_factor * costs.prefill_s("full_prefill", tokens)
    strategies = ["full_prefill", "full_reuse", "droidspeak"]
    caps = {s: capacity(s, costs, slo, lambda rate: receiver_workload(rate, 2000, tokens), units=units)
            for s in strategies}
    top = caps["droidspeak"] * 1.3
    curve = []
    for rate in np.linspace(top / 20, top, 20):
        for s in strategies:
            recs = simulate_serving(receiver_workload(float(rate), 2000, tokens), s, costs, units=units)
            t = np.array([r.ttft for r in recs])
            curve.append({"strategy": s, "rate": float(rate), "ttft_mean_s": float(t.mean()),
                          "ttft_p90_s": float(np.percentile(t, 90)), "slo_attainment": float(np.mean(t <= slo))})
    result = {"tokens": tokens, "receiver_units": units, "slo_ttft_s": slo, "slo_factor": slo_factor,
              "costs": costs.to_json(), "cost_source": meta, "capacity_at_slo": caps,
              "throughput_ratio_vs_full_prefill": {s: caps[s] / caps["full_prefill"] for s in strategies},
              "paper": "2-4x higher throughput under an SLO set before full prefill's knee (Fig. 15)",
              "curve": curve, "limits": "decode steps were not measured on the H200, so requests produce one token; "
                                        "the senders' caches are published beforehand on their own replicas",
              "command": "python -m ds_study.sim_study fig15"}
    write_json(out / "fig15_h200_llama3_8b.json", result)
    return result


def fig21(run: Path, out: Path = OUT, dataset: str = "pysum", rate: float | None = None, burstiness: float = 0.3,
          n: int = 600, seed: int = 0) -> dict:
    """Fig. 21 on the CPU costs (calibrated from the run's lowest-rate full_prefill and full_reuse
    iterations) and the pair's KL frontier: SLO violation rate against quality for every fixed
    frontier plan and for adaptation; then the bandwidth sweep, load-only against bandwidth-aware."""
    summary, _, iterations = load_run(run)
    pair, st = summary["pair"], summary["settings"]
    n_layers, kvb, eb = model_bytes(pair)
    cal = min(r["rate"] for r in summary["runs"])
    # receivers' full prefill and full reuse price a recomputed layer and the final pass; the droidspeak run
    # gives what its senders (which publish the plan's entries) and decode steps cost
    its = [it for s in ("full_prefill", "full_reuse") for it in iterations[f"{s}@{cal:g}"]
           if it["op"] == "prefill" and it["role"] == "receiver"]
    its += [it for it in iterations[f"droidspeak@{cal:g}"] if it["op"] == "decode" or it["role"] == "sender"]
    costs = calibrate(its, n_layers, kvb, eb, source=f"{run} at {cal:g} contexts/s")
    ds = [it for it in iterations[f"droidspeak@{cal:g}"] if it["op"] == "prefill" and it["role"] == "receiver"]
    check = None
    if ds:  # the per-layer model against the measured droidspeak plan of the same run
        k = sum(int(b) - int(a) + 1 for a, b in (g.split("-") for g in str(st["plan"]).split(",")))
        pred = [costs.droidspeak_s(k, it["tokens"], st["gbps"]) for it in ds]
        real = [it["end"] - it["start"] for it in ds]
        check = {"plan": st["plan"], "k": k, "measured_mean_s": float(np.mean(real)),
                 "predicted_mean_s": float(np.mean(pred)), "error": err(float(np.mean(pred)), float(np.mean(real)))}
    frontier = kl_frontier(pair, dataset)
    tokens = [it["tokens"] for it in its if it["op"] == "prefill" and it["role"] == "receiver"]
    mean_tokens = int(np.mean(tokens))
    slo = st["slo_ttft_s"]
    target = frontier[0].quality / 2  # recover at least half of full reuse's KL gap
    if rate is None:  # half the rate at which the cheapest plan (full reuse) still holds the SLO for 90%
        rate = 0.5 * capacity("droidspeak", costs, slo, lambda r: paired(r, 300, mean_tokens, st["delay_s"],
                                                                        st["max_new_tokens"], burstiness, seed + 1),
                              max_batch=st["max_batch"], gbps=st["gbps"], policy=FixedPolicy(frontier[0]))
    reqs = paired(rate, n, mean_tokens, st["delay_s"], st["max_new_tokens"], burstiness, seed)
    quality = {p.k: p.quality for p in frontier}

    def run_policy(policy, gbps):
        recs = [r for r in simulate_serving(reqs, "droidspeak", costs, max_batch=st["max_batch"], gbps=gbps,
                                            policy=policy) if r.role == "receiver"]
        ks = [int(r.plan[2:]) for r in recs]
        return {"policy": policy.name, "gbps": gbps, "slo_violation": float(np.mean([r.ttft > slo for r in recs])),
                "mean_kl": -float(np.mean([quality[k] for k in ks])), "mean_k": float(np.mean(ks)),
                "ttft_mean_s": float(np.mean([r.ttft for r in recs]))}

    nominal = st["gbps"]
    points = [run_policy(FixedPolicy(p), nominal) for p in frontier]
    adaptive = [run_policy(LoadPolicy(frontier, costs, target, slo, nominal), nominal),
                run_policy(BandwidthAwarePolicy(frontier, costs, target, slo, nominal), nominal)]
    sweep = []
    for gbps in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, nominal):
        sweep.append(run_policy(LoadPolicy(frontier, costs, target, slo, nominal), gbps))  # priced at the profiled bandwidth
        sweep.append(run_policy(BandwidthAwarePolicy(frontier, costs, target, slo, gbps), gbps))
    result = {"pair": pair, "dataset": dataset, "rate": rate, "burstiness": burstiness, "n_contexts": n,
              "slo_ttft_s": slo, "kl_target": -target, "mean_prompt_tokens": mean_tokens, "nominal_gbps": nominal,
              "costs": costs.to_json(), "per_layer_model_check": check,
              "frontier": [p.__dict__ for p in frontier], "fixed": points, "adaptive": adaptive,
              "bandwidth_sweep": sweep, "command": f"python -m ds_study.sim_study fig21 --run {run}"}
    write_json(out / pair / "fig21_adaptation.json", result)
    return result


def paired(rate, n, tokens, delay_s, max_new, burstiness, seed) -> list[ServeRequest]:
    """The server's paired workload (``workload.paired_requests``) over contexts of ``tokens`` tokens."""
    context = SimpleNamespace(prefix_ids=range(tokens), suffix_ids=[])
    return paired_requests([context], rate, n, delay_s, max_new, burstiness, seed)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job", choices=["validate", "fig15", "fig21", "all"])
    ap.add_argument("--run", type=Path, help="a finished serve run directory (validate, fig21)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.job in ("validate", "fig21", "all") and args.run is None:
        ap.error(f"{args.job} needs --run DIR (a finished python -m ds_study.serve run)")
    if args.job in ("validate", "all"):
        v = validate(args.run, args.out)
        print(f"simulator vs server: largest |error| {v['max_abs_error']:.1%} (goal 10%)")
    if args.job in ("fig15", "all"):
        f = fig15(args.out)
        print("Fig. 15 (H200, Llama-3-8B shape): throughput at the SLO vs full prefill: "
              + ", ".join(f"{s} {x:.2f}x" for s, x in f["throughput_ratio_vs_full_prefill"].items()))
    if args.job in ("fig21", "all"):
        f = fig21(args.run, args.out)
        print("Fig. 21: " + "; ".join(f"{a['policy']}: {a['slo_violation']:.1%} violations, KL {a['mean_kl']:.4f}"
                                       for a in f["adaptive"]))


if __name__ == "__main__":
    main()
