"""The whole study on the paper's own pairs (ds_study/conf/model_pair/paper_*.yaml), on a GPU host whose
local Hugging Face cache holds their weights.

    python scripts/paper_study.py all --data /data/longbench              # every paper pair
    python scripts/paper_study.py paper_toolace paper_mistrallite --data /data/longbench
    python scripts/paper_study.py all --check                             # what is missing, nothing run
    python scripts/paper_study.py paper_toolace --device cpu --dtype float32 --limit 2 workers=1   # a smoke run

For each pair, in one process (the pair is loaded once), as the command lines it prints:

1. ``python -m ds_study.study model_pair=P study=all`` over the pair's ``datasets`` (the paper's three
   for that pair): quality (Fig. 6), single-layer sensitivity (Fig. 7, 8), propagation (Fig. 10),
   transfer (Fig. 17);
2. ``python -m ds_study.profile --config-name profile_full model_pair=P search.method=both
   search.greedy_granularity=2`` on the pair's task: deviation, the 2-layer-group frontier and its
   selections, and greedy against exhaustive.

Device, dtype, max_length and batch_size come from the pair's ``run:`` block, unless given here. Every
pair is checked first, before any model loads: its two checkpoints complete in the local cache
(``HF_HUB_OFFLINE=1``: nothing is downloaded), their configs and tokenizers compatible, every dataset
readable, every setting valid. A pair that fails is refused in one line and nothing runs
(``--skip-missing``: the others run). Cells are resumable: rerun the same command after an interruption.

LongBench data: ``--data DIR`` holding ``<dataset>.jsonl`` as LongBench's data.zip unzips
(https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip), or the ``datasets`` cache of
Xnhyacinth/LongBench. Other ``KEY=VALUE`` arguments are Hydra overrides: ``study.*`` go to the study,
``search.*`` to the profile, the rest to both.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: never download (hundreds of GB)

from omegaconf import OmegaConf  # noqa: E402

from ds_study import runner  # noqa: E402
from ds_study.cli import EXIT_USER_ERROR, user_message  # noqa: E402

PAIR_DIR = runner.CONF_DIR / "model_pair"
PROFILE = ["search.method=both", "search.greedy_granularity=2"]


class Refused(ValueError):
    """A pair that cannot run here (said in one line)."""


def paper_pairs() -> list[str]:
    return sorted(p.stem for p in PAIR_DIR.glob("paper_*.yaml"))


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="paper pairs: " + ", ".join(paper_pairs()))
    ap.add_argument("items", nargs="+", metavar="PAIR|all|KEY=VALUE",
                    help="paper pairs (or all), then any Hydra overrides")
    ap.add_argument("--data", help="directory of LongBench <dataset>.jsonl files (dataset_dir)")
    ap.add_argument("--device", help="default: the pair's run.device (cuda)")
    ap.add_argument("--dtype", help="default: the pair's run.dtype (bfloat16)")
    ap.add_argument("--max-length", type=int, help="prompt + answer tokens; default: the pair's run.max_length")
    ap.add_argument("--batch-size", type=int, help="default: the pair's run.batch_size")
    ap.add_argument("--limit", type=int, help="first N examples of each dataset only (default: all; the paper: 50)")
    ap.add_argument("--jobs", default="study,profile", help="study, profile or both (default)")
    ap.add_argument("--publish", action="store_true",
                    help="also write results/study/<pair> and results/search/<pair> (the committed result files)")
    ap.add_argument("--check", action="store_true", help="check every pair, run nothing")
    ap.add_argument("--skip-missing", action="store_true", help="run the pairs that pass the check, skip the others")
    args = ap.parse_intermixed_args(argv)
    args.overrides = [a for a in args.items if "=" in a]
    names = [a for a in args.items if "=" not in a]
    args.pairs = paper_pairs() if names == ["all"] else names
    unknown = [n for n in args.pairs if not (PAIR_DIR / f"{n}.yaml").is_file()]
    if unknown or not args.pairs:
        ap.error(f"unknown pair(s) {unknown}; the paper's: {', '.join(paper_pairs())} (or all)")
    args.jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    if not args.jobs or set(args.jobs) - {"study", "profile"}:
        ap.error(f"--jobs must name study and/or profile, got {args.jobs}")
    return args


def overrides(args, name: str) -> dict[str, list[str]]:
    """The Hydra overrides of each job of one pair: the pair's run block, then this command's flags."""
    mp = OmegaConf.load(PAIR_DIR / f"{name}.yaml")
    run = dict(mp.get("run") or {})
    for key, flag in (("device", args.device), ("dtype", args.dtype), ("max_length", args.max_length),
                      ("batch_size", args.batch_size)):
        if flag is not None:
            run[key] = flag
    common = [f"model_pair={name}", *(f"{k}={v}" for k, v in run.items())]
    if args.limit:
        common.append(f"limit={args.limit}")
    if args.data:
        common.append(f"dataset_dir={Path(args.data).resolve()}")
    datasets = "[" + ",".join(mp.get("datasets") or [mp.task]) + "]"
    study = [*common, "study=all", f"study.quality.datasets={datasets}", f"study.transfer.datasets={datasets}"]
    profile = [*common, *PROFILE]
    if args.publish:
        study.append("study.publish=true")
        profile.append("search.publish=true")
    for o in args.overrides:  # study.* to the study, search.* to the profile, the rest to both
        if not o.lstrip("+~").startswith("search."):
            study.append(o)
        if not o.lstrip("+~").startswith("study."):
            profile.append(o)
    return {"study": study, "profile": profile}


def check(jobs: dict[str, list[str]]) -> dict:
    """Everything that needs no weights, for one pair: its composed configs, both checkpoints complete
    in the local cache, configs and tokenizers compatible, every dataset readable, the study's and the
    search's settings. Raises the first problem (a user error, reported in one line)."""
    from transformers import AutoConfig, AutoTokenizer

    from ds_study import search, study
    from ds_study.data import build_prompt
    from ds_study.pair import DTYPES, check_compatible, config_ref, shape_of

    cfgs = {"study": runner.compose("study", jobs["study"]), "profile": runner.compose("profile_full", jobs["profile"])}
    cfg = cfgs["study"]
    runner.validate(cfg)  # the pair's references (in the local cache, complete), split, limit, device
    if cfg.dtype not in DTYPES:
        raise Refused(f"dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    mp = cfg.model_pair
    refs = {"receiver": config_ref(mp.receiver), "sender": config_ref(mp.sender)}
    confs = {k: AutoConfig.from_pretrained(v) for k, v in refs.items()}
    toks = {k: AutoTokenizer.from_pretrained(v) for k, v in refs.items()}
    check_compatible(confs["receiver"], confs["sender"], toks["receiver"], toks["sender"], mp.receiver, mp.sender)
    n_layers = shape_of(confs["receiver"])["num_hidden_layers"]
    sc = OmegaConf.to_container(cfg.study)
    for d in dict.fromkeys([mp.task, *(sc["quality"]["datasets"] or []), *(sc["transfer"]["datasets"] or [])]):
        one = cfg.copy()
        OmegaConf.set_struct(one, False)
        one.dataset, one.dataset_path = d, cfg.dataset_path if d == mp.task else None
        task = runner.validate(one)
        records = runner.records_of(one, task)
        if not records:
            raise Refused(f"dataset {d}: no {cfg.split} examples (LongBench's first 50 records are the profile split)")
        for r in records:  # every prompt fits max_length with room for the answer (else: an error hours in)
            build_prompt(r, task, toks["receiver"], cfg.max_length)
    study.check_config(cfg, n_layers)
    runner.plans_of(cfgs["profile"].plans, n_layers)
    search.check_config(cfgs["profile"].search, n_layers, cfgs["profile"].split)
    return cfgs


def command(job: str, ov: list[str]) -> str:
    head = "python -m ds_study.study" if job == "study" else "python -m ds_study.profile --config-name profile_full"
    return " ".join([head, *(f"'{o}'" if any(c in o for c in "[]$,") else o for o in ov)])


def run_pair(name: str, cfgs: dict, jobs: dict, which: list[str]) -> None:
    import torch

    from ds_study import profile, study

    print(f"\n== {name}: receiver {cfgs['study'].model_pair.receiver} <- sender {cfgs['study'].model_pair.sender}",
          flush=True)
    pair = runner.load_pair_from(cfgs["study"])  # once for both jobs (two 70B loads cost minutes)
    try:
        for job in which:
            print(f"\n$ {command(job, jobs[job])}", flush=True)
            (study.main if job == "study" else profile.main)(cfgs[job], pair)
    finally:
        del pair
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    plan, refused = {}, []
    for name in args.pairs:
        jobs = overrides(args, name)
        try:
            plan[name] = (check(jobs), jobs)
            print(f"ok      {name}", flush=True)
        except Exception as ex:  # noqa: BLE001 - user errors in one line, bugs with their traceback
            message = str(ex) if isinstance(ex, Refused) else user_message(ex)
            if message is None:
                raise
            refused.append(name)
            print(f"{'skip' if args.skip_missing else 'error'}   {name}: {message.splitlines()[0]}", file=sys.stderr)
    if refused and not args.skip_missing:
        print(f"refused {len(refused)} of {len(args.pairs)} pairs before any work ({', '.join(refused)}); "
              f"--skip-missing runs the others", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.check or not plan:
        return EXIT_USER_ERROR if not plan else 0
    for name, (cfgs, jobs) in plan.items():
        try:
            run_pair(name, cfgs, jobs, args.jobs)
        except Exception as ex:  # noqa: BLE001 - as above; what is done stays done (cells), rerun to resume
            message = user_message(ex)
            if message is None:
                raise
            print(f"error   {name}: {message.splitlines()[0]}", file=sys.stderr)
            return EXIT_USER_ERROR
    print(f"\ndone: {', '.join(plan)}" + (f"; skipped {', '.join(refused)}" if refused else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
