"""The load generator (paper §4.5, Fig. 15): serve one pair's Poisson stream under every strategy.

    python -m ds_study.serve                                     # the smol default, every strategy
    python -m ds_study.serve 'rates=[0.1,0.2,0.3]' serve.publish=true
    python -m ds_study.serve run_dir=results/runs/<run>          # resume an interrupted sweep

Per (rate, strategy) it serves the same workload (``serving.workload``: same seed, same contexts)
on a fresh ``serving.Server`` and writes, into the run directory, the request log
(``requests/<strategy>@<rate>.jsonl``, one line per request with every token's time), what each
server iteration ran and for how long (``iterations/...``, the simulator's calibration) and its
summary (``runs/<strategy>@<rate>.json``: TTFT / TPOT / ITL / E2E mean, median, p90, p99,
throughput and goodput at the TTFT SLO; ``serving.report``). A finished (rate, strategy) run is
never redone: ``run_dir=`` resumes. ``summary.json`` and ``table.txt`` gather them;
``serve.publish=true`` also copies them to ``results/serving/<pair>/<serve.name>/`` (committed:
what the figures and the simulator's validation read).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ds_study import runner
from ds_study.cli import hydra_main
from ds_study.link import Link
from ds_study.records import command_line, write_json, write_jsonl, write_text
from ds_study.serving.report import summarize, table
from ds_study.serving.server import SERVE_STRATEGIES, Fault, Server
from ds_study.serving.store import model_identity
from ds_study.serving.workload import paired_requests

FAULT_KINDS = ("kill_replica", "corrupt")


def rates_of(cfg: DictConfig) -> list[float]:
    rates = list(cfg.rates) if cfg.get("rates") else [cfg.rate]
    bad = [r for r in rates if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0]
    if bad:
        raise ValueError(f"request rates must be positive numbers (contexts per second), got {bad}")
    return [float(r) for r in rates]


def faults_of(cfg: DictConfig) -> list[Fault]:
    out = []
    for f in OmegaConf.to_container(cfg.faults) or []:
        if not isinstance(f, dict) or f.get("kind") not in FAULT_KINDS:
            raise ValueError(f"a fault is {{kind: {'|'.join(FAULT_KINDS)}, ...}}, got {f!r}")
        if f["kind"] == "kill_replica" and not 0 <= int(f.get("replica", 0)) < cfg.replicas:
            raise ValueError(f"fault kills replica {f.get('replica')}, but replicas={cfg.replicas}")
        out.append(Fault(**f))
    return out


def check_config(cfg: DictConfig, n_layers: int) -> None:
    """Everything checkable before any weights load."""
    unknown = [s for s in cfg.strategies if s not in SERVE_STRATEGIES]
    if unknown or not cfg.strategies:
        raise ValueError(f"unknown serving strategies {unknown}; choose from {', '.join(SERVE_STRATEGIES)}")
    if "droidspeak" in cfg.strategies:
        from ds_study.serving.server import droidspeak_plan

        droidspeak_plan(str(cfg.plan), n_layers)
    rates_of(cfg)
    faults_of(cfg)
    for name in ("n_contexts", "max_new_tokens", "max_batch", "replicas"):
        if not isinstance(cfg[name], int) or cfg[name] < 1:
            raise ValueError(f"{name} must be a positive integer, got {cfg[name]!r}")
    if not cfg.slo_ttft_s > 0 or cfg.delay_s < 0 or not cfg.burstiness > 0:
        raise ValueError("need slo_ttft_s > 0, delay_s >= 0 and burstiness > 0")
    if cfg.get("run_dir") and not Path(cfg.run_dir).is_dir():
        raise ValueError(f"run_dir={cfg.run_dir} is not a directory; give an earlier serve run's directory or null")


def label(strategy: str, rate: float) -> str:
    return f"{strategy}@{rate:g}"


def serve_once(cfg: DictConfig, pair, prompts: list, strategy: str, rate: float, n_contexts: int | None = None,
               faults: list[Fault] = (), progress: bool = True):
    """One workload on a fresh server: its request records and its iteration log (``Server.iterations``)."""
    eos = () if cfg.ignore_eos else [pair.tokenizer.eos_token_id]
    n = n_contexts or cfg.n_contexts
    requests = paired_requests(prompts, rate, n, cfg.delay_s, cfg.max_new_tokens, cfg.burstiness, cfg.seed,
                               cfg.replicas, eos)
    link = Link(gbps=cfg.gbps, latency_s=cfg.latency_ms / 1e3)
    server = Server(pair.receiver, pair.sender, model_identity(pair.receiver_id), model_identity(pair.sender_id),
                    strategy, str(cfg.plan), link, cfg.max_batch, cfg.loader, cacheblend_ratio=cfg.cacheblend_ratio,
                    replicas=cfg.replicas)
    bar = tqdm(total=len(requests), desc=f"serve {label(strategy, rate)}", unit="req", disable=not progress,
               leave=False)

    def report(done: int, waiting: int) -> None:
        bar.update(done - bar.n)
        bar.set_postfix(waiting=waiting, refresh=False)

    try:
        return server.run(requests, faults, report), server.iterations
    finally:
        bar.close()


def main(cfg: DictConfig, pair=None) -> dict:
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.dataset = None
    task = runner.validate(cfg)
    check_config(cfg, pair.n_layers if pair is not None else runner.receiver_layers(cfg))
    pair = pair if pair is not None else runner.load_pair_from(cfg)
    prompts = [ex.prompt for ex in runner.prepare(pair, task, runner.records_of(cfg, task), cfg.max_length)]
    run = Path(cfg.run_dir) if cfg.get("run_dir") else runner.start_run(cfg, "serve", task)
    runner.write_json(run / "env.json", runner.environment(cfg.device))
    print(f"serving {cfg.model_pair.name} ({pair.receiver_id['name']} <- {pair.sender_id['name']}): "
          f"{cfg.n_contexts} contexts per run, strategies {', '.join(cfg.strategies)}, rates {rates_of(cfg)} -> {run}")
    warmed: set[str] = set()
    for rate in rates_of(cfg):
        for strategy in cfg.strategies:
            out = run / "runs" / f"{label(strategy, rate)}.json"
            if out.exists():
                print(f"  {label(strategy, rate)}: done earlier, kept")
                continue
            if cfg.warmup and strategy not in warmed:
                serve_once(cfg, pair, prompts, strategy, 100.0, n_contexts=1, progress=False)
                warmed.add(strategy)
            t = time.perf_counter()
            records, iterations = serve_once(cfg, pair, prompts, strategy, rate, faults=faults_of(cfg))
            summary = summarize(records, cfg.slo_ttft_s)
            write_jsonl(run / "requests" / f"{label(strategy, rate)}.jsonl", [r.to_json() for r in records],
                        quiet=True)
            write_jsonl(run / "iterations" / f"{label(strategy, rate)}.jsonl", iterations, quiet=True)
            write_json(out, {"strategy": strategy, "rate": rate, "plan": str(cfg.plan) if strategy == "droidspeak"
                             else strategy, "seconds": round(time.perf_counter() - t, 1), **summary}, quiet=True)
            rs = summary["receiver"]
            print(f"  {label(strategy, rate)}: receiver TTFT mean {rs['ttft_ms']['mean']:.0f} ms, "
                  f"p90 {rs['ttft_ms']['p90']:.0f} ms, SLO attainment {rs['slo_attainment']:.0%}, "
                  f"goodput {rs['goodput']:.3f} req/s")
    runs = [json.loads((run / "runs" / f"{label(s, r)}.json").read_text()) for r in rates_of(cfg) for s in cfg.strategies]
    result = {"pair": cfg.model_pair.name, "models": pair.identities(), "dataset": task.name, "split": cfg.split,
              "command": command_line(), "settings": {k: OmegaConf.to_container(cfg)[k] for k in (
                  "plan", "cacheblend_ratio", "burstiness", "n_contexts", "seed", "delay_s", "max_new_tokens",
                  "ignore_eos", "slo_ttft_s", "max_batch", "replicas", "gbps", "latency_ms", "loader", "threads")},
              "environment": runner.environment(cfg.device), "runs": runs}
    write_json(run / "summary.json", result)
    write_text(run / "table.txt", "\n\n".join(table(r, label(r["strategy"], r["rate"])) for r in runs) + "\n")
    if cfg.serve.publish:
        publish(run, Path(cfg.results_root).parent / "serving" / cfg.model_pair.name / cfg.serve.name)
    print(f"serving done; results in {run}")
    return result


def publish(run: Path, dest: Path) -> Path:
    """``serve.publish=true``: copy the run's summary, table, per-run summaries, request and iteration logs
    to ``dest`` (committed results: what the figures and ``ds_study.sim_study`` read)."""
    import shutil

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for part in ("summary.json", "table.txt", "runs", "requests", "iterations"):
        src = run / part
        if src.is_dir():
            shutil.copytree(src, dest / part)
        elif src.exists():
            shutil.copyfile(src, dest / part)
    print(f"published the serving run to {dest}")
    return dest


@hydra_main("serve")
def cli(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    cli()
