"""Shared plumbing of the pipelines: config -> pair and examples, cell evaluation, results on disk.

Results follow lm-evaluation-harness's habits: every run gets its own directory (never
overwritten) holding the resolved config, the environment, per-example samples and a summary with
metric versions and model identities. Evaluated (plan, example) *cells* are also appended, one
JSON line each, to a per-pair cell file as soon as they finish; rerunning any command reuses the
cells already there, so an interruption loses at most the cell in progress.

New cells go to the user's store (``cells_root``, default ``$DS_STUDY_HOME/cells``, i.e.
``~/.cache/ds_study/cells``); the committed ``results/cells`` is a read-only *seed* (``cells_seed``,
null disables it) consulted after the user's store, so no command but the explicit regeneration of
the committed results (``python -m ds_study.pairs``) changes a tracked file.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import functools
import hashlib
import itertools
import json
import os
import platform
import subprocess
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ds_study import batched, data, metrics
from ds_study.caches import ContextCache
from ds_study.executor import Decoded, GroupMemo, capture, decode, run_plan
from ds_study.plans import Plan, parse_plan
from ds_study.pair import ModelPair, load_pair

# The Hydra configs ship with the package (package data), so a non-editable install finds them too.
CONF_DIR = Path(__file__).resolve().parent / "conf"
# The checkout the package runs from; in a non-editable install this is site-packages, which is no
# git checkout (``in_checkout`` is False) and environment() then records no commit.
REPO_ROOT = Path(__file__).resolve().parents[1]


def in_checkout() -> bool:
    """The package runs from a git checkout (an editable install or the source tree)."""
    return (REPO_ROOT / ".git").exists()


# --------------------------------------------------------------------------------------------
# Config -> pair, task, examples


def task_of(cfg: DictConfig) -> data.TaskSpec:
    name = cfg.get("dataset") or cfg.model_pair.task
    if name not in data.TASKS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(data.TASKS))}")
    return data.TASKS[name]


def records_of(cfg: DictConfig, task: data.TaskSpec) -> list[dict]:
    """Records of the configured split; LongBench subsets hold out their first 50 as the profile split.
    A LongBench subset is read from ``dataset_path``, else ``dataset_dir/<name>.jsonl``, else the Hub."""
    path = cfg.get("dataset_path")
    if not path and task.source == "longbench" and cfg.get("dataset_dir"):
        path = data.longbench_file(cfg.dataset_dir, task.name)
    if task.source == "longbench" or path:
        recs = data.load_records(task.name, "test", path=path)
        recs = data.split_records(recs, cfg.split) if task.source == "longbench" else recs
    else:
        recs = data.load_records(task.name, cfg.split)
    return recs[: cfg.limit] if cfg.get("limit") else recs


def check_model_pair(cfg: DictConfig) -> None:
    """The pair's settings, first: every mandatory (``???``) field set, and local model paths that
    exist, before any dataset is read or transformers is called."""
    from ds_study.pair import check_ref

    mp = cfg.model_pair
    missing = [k for k in ("receiver", "sender", "task", "name") if OmegaConf.is_missing(mp, k)]
    if missing:
        raise ValueError(f"model_pair={'?' if 'name' in missing else mp.name} needs "
                         + ", ".join(f"model_pair.{k}" for k in missing) + ": pass "
                         + " ".join(f"model_pair.{k}=..." for k in missing)
                         + " (receiver and sender: checkpoint directories or Hub ids)")
    check_ref(mp.receiver, "model_pair.receiver")
    check_ref(mp.sender, "model_pair.sender")


def validate(cfg: DictConfig) -> data.TaskSpec:
    """Every check that needs no model weights, so bad input fails in seconds."""
    check_model_pair(cfg)
    task = task_of(cfg)
    if cfg.split not in ("profile", "test"):
        raise ValueError(f"split must be 'profile' or 'test', got {cfg.split!r}")
    limit = cfg.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of examples or null (all), got {limit!r}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device} but CUDA is not available here; use device=cpu")
    return task


def receiver_layers(cfg: DictConfig) -> int:
    """Layer count from the receiver's config alone (cheap), to validate plans before loading weights."""
    from transformers import AutoConfig

    from ds_study.pair import check_ref, config_ref, shape_of

    check_ref(cfg.model_pair.receiver, "model_pair.receiver")
    return shape_of(AutoConfig.from_pretrained(config_ref(cfg.model_pair.receiver)))["num_hidden_layers"]


def workers_of(cfg: DictConfig) -> int:
    """Processes that evaluate cells: ``workers`` as given, or ``auto``: one per CPU core (at most 4)
    on CPU, where small models run better as single-threaded processes than as one multi-threaded
    one, and 1 on an accelerator."""
    w = cfg.get("workers") or 1
    if str(w) == "auto":
        return max(1, min(4, os.cpu_count() or 1)) if str(cfg.get("device", "cpu")) == "cpu" else 1
    try:
        return max(1, int(w))
    except ValueError:
        raise ValueError(f"workers must be a positive integer or 'auto', got {w!r}") from None


def compose(config_name: str, overrides: list[str] = (), conf_dir: Path = CONF_DIR) -> DictConfig:
    """A config as its command line would make it (``python -m ds_study.<config_name> OVERRIDES``),
    for callers that are not Hydra apps (benchmarks, the pair table)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))


def load_pair_from(cfg: DictConfig) -> ModelPair:
    threads = cfg.get("threads") or (1 if workers_of(cfg) > 1 else None)  # workers share the cores
    if threads:
        torch.set_num_threads(int(threads))
    mp = cfg.model_pair
    return load_pair(mp.receiver, mp.sender, dtype=cfg.dtype, device=cfg.device)


@dataclass
class Example:
    record: dict
    prompt: data.Prompt

    @functools.cached_property  # looked up for every cell
    def input_sha(self) -> str:
        """What a cell of this example was computed and scored from: prompt token ids and references.
        A cell stored under another input (edited data, a new template) is recomputed, not reused."""
        text = json.dumps([self.prompt.prefix_ids, self.prompt.suffix_ids, self.record["answers"]])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def id(self) -> str:
        return self.record["_id"]


def prepare(pair: ModelPair, task: data.TaskSpec, records: list[dict], max_length: int) -> list[Example]:
    return [Example(r, data.build_prompt(r, task, pair.tokenizer, max_length)) for r in records]


# --------------------------------------------------------------------------------------------
# Evaluating cells


def prediction_text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def score(task: data.TaskSpec, prediction: str, record: dict) -> float:
    return metrics.score_example(prediction, record["answers"], task.metric, dataset=task.name)


def default_cells_root() -> Path:
    """The user's cell store: ``$DS_STUDY_HOME/cells``, default ``~/.cache/ds_study/cells``."""
    return Path(os.environ.get("DS_STUDY_HOME") or Path.home() / ".cache" / "ds_study") / "cells"


def cells_roots(cfg: DictConfig) -> tuple[Path, Path | None]:
    """(where new cells go, the read-only seed or None): ``cells_root`` (null: the user's store,
    ``default_cells_root``) and ``cells_seed`` (null: none; the same directory as ``cells_root``:
    none, that store is written anyway)."""
    root = Path(str(cfg.get("cells_root") or default_cells_root())).expanduser()
    seed = cfg.get("cells_seed")
    seed = Path(str(seed)).expanduser() if seed else None
    if seed is not None and seed.resolve() == root.resolve():
        seed = None
    return root, seed


def cell_store(cfg: DictConfig, pair: ModelPair, task: data.TaskSpec, split: str | None = None) -> "CellStore":
    """The pair's CellStore for ``split`` (default ``cfg.split``) under the configured roots."""
    root, seed = cells_roots(cfg)
    name = cfg.model_pair.name
    return CellStore(root / name, pair, task, split or cfg.split, cfg.max_length,
                     seed=None if seed is None else seed / name)


class CellStore:
    """Append-only JSONL of evaluated (plan, example) cells, keyed so reruns skip finished work.

    The file is specific to the pair's two weight hashes, the metric version, the prompt length and
    the generation length (the hashed key), and to the split, dtype and device (named), so a changed
    model, scoring rule or numeric setting never reuses stale cells; each row also records its
    example's input (``Example.input_sha``), so edited data never does either.

    ``seed``: a directory of the same layout (the committed ``results/cells/<pair>``) whose file of
    the same name is read, never written; a cell is looked up in ``root``'s file first, then there.

    Any number of processes may share the file (a job's workers, the jobs of a sweep, SLURM jobs on a
    shared file system): each cell is one line appended in one write under an exclusive ``flock``.
    """

    def __init__(self, root: Path, pair: ModelPair, task: data.TaskSpec, split: str, max_length: int,
                 seed: Path | None = None):
        ident = json.dumps([pair.receiver_id["weights_sha256"], pair.sender_id["weights_sha256"],
                            task.metric, metrics.get_metric(task.metric).version, max_length, task.max_new_tokens])
        key = hashlib.sha256(ident.encode()).hexdigest()[:12]
        p = next(pair.receiver.parameters())
        numerics = f"{str(p.dtype).removeprefix('torch.')}_{p.device.type}"
        self.path = Path(root) / f"{task.name}_{split}_{key}_{numerics}.jsonl"
        self.seed_path = None if seed is None else Path(seed) / self.path.name
        if self.seed_path is not None and self.seed_path.resolve() == self.path.resolve():
            self.seed_path = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.cells: dict[tuple[str, str], dict] = {}  # the user's store (written)
        self.seed_cells: dict[tuple[str, str], dict] = {}  # the seed (read only)
        if self.seed_path is not None and self.seed_path.is_file():
            self.seed_cells = self._parse(self.seed_path.read_text())
        self.reload()

    @staticmethod
    def _parse(text: str) -> dict[tuple[str, str], dict]:
        cells = {}
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a cell cut off by a kill: redo it
                continue
            cells[(row["plan"], row["id"])] = row
        return cells

    def reload(self) -> None:
        """Read the file again (other processes may have appended cells)."""
        if not self.path.exists():
            return
        text = self.path.read_text()
        self.cells.update(self._parse(text))
        if text and not text.endswith("\n"):  # a line cut off by a kill (or still being written): end
            self._append("")                      # it under the lock, or the next cell would join it

    def get(self, plan: str, example_id: str) -> dict | None:
        row = self.cells.get((plan, example_id))
        return row if row is not None else self.seed_cells.get((plan, example_id))

    def line_count(self) -> int:
        """Lines in the file now (worker processes append to it): progress of a parallel fill."""
        try:
            with open(self.path, "rb") as f:
                return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
        except FileNotFoundError:
            return 0

    def add(self, row: dict) -> None:
        self.cells[(row["plan"], row["id"])] = row
        self._append(json.dumps(row) + "\n")

    def _append(self, text: str) -> None:
        # whole lines in one write() on an O_APPEND descriptor, under an exclusive flock: the cells of
        # concurrent writers (worker processes, parallel sweep jobs, SLURM jobs sharing the store over
        # NFS) never interleave, and the check for a line cut off by a kill sees no line half written
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released by close()
            except OSError as e:  # a file system without locks (Lustre mounted without -o flock)
                if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
                    raise
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                text = "\n" + text  # a line cut off (by a kill) since: end it, or this cell would be glued to it
            data = text.encode()
            if data:
                if os.write(fd, data) != len(data):
                    raise OSError(f"short write to {self.path}; the cell will be recomputed on the next run")
                os.fsync(fd)
        finally:
            os.close(fd)


class Evaluator:
    """Runs plans on examples for one pair and keeps every scored (plan, example) cell.

    Cells are computed in batches of ``batch_size`` examples through ``ds_study.batched`` (every
    plan of a batch shares the contexts' captures and recomputed layers), each row holding the task
    score, the gold answer's teacher-forced ``nll`` and the ``kl`` from the receiver's full prefill.
    ``run`` is the one-at-a-time executor path (the engine's, and the reference the batched path is
    tested and benchmarked against): it caches the ``keep`` most recent examples' captures.
    ``n_run`` and ``n_reused`` count cells computed and cells found in the store; ``n_cached``
    counts the reused cells that this evaluator (or its workers) did not compute, i.e. results
    taken from an earlier run (the user's store or the committed seed).
    """

    def __init__(self, pair: ModelPair, task: data.TaskSpec, store: CellStore | None = None, keep: int = 1,
                 workers: int = 1, worker_cfg: DictConfig | None = None, batch_size: int = 8):
        self.pair, self.task, self.store, self.keep = pair, task, store, max(1, int(keep))
        self.workers, self.worker_cfg = max(1, int(workers or 1)), worker_cfg
        self.batch_size = max(1, int(batch_size or 1))
        rule, tok = metrics.stop_rule(task.metric), pair.tokenizer  # early stop that cannot change the score
        self.stop = None if rule is None else (lambda ids: rule(tok.decode(ids, skip_special_tokens=True)))
        self._entries: OrderedDict[str, dict] = OrderedDict()  # example id -> sender/receiver/ref/memo
        self._mem: dict[tuple[str, str], dict] = {}  # cells, when there is no store
        self._batch: tuple | None = None  # (example ids, batched.BatchContext) of the last batch: the next
        #                                   call on the same examples (a greedy step) captures nothing again
        self.n_run = self.n_reused = self.n_cached = 0
        self._fresh: set[tuple[str, str]] = set()  # (plan, example) cells computed by this evaluator or its workers

    def _entry(self, ex: Example) -> dict:
        e = self._entries.get(ex.id)
        if e is None:
            e = self._entries[ex.id] = {"sender": None, "receiver": None, "ref": None, "memo": None}
            while len(self._entries) > self.keep:
                self._entries.popitem(last=False)
        self._entries.move_to_end(ex.id)
        return e

    def caches(self, ex: Example, need_receiver: bool = False) -> tuple[ContextCache, ContextCache | None]:
        """(sender cache with E, receiver cache with E or None), memoized per example."""
        e = self._entry(ex)
        if e["sender"] is None:
            e["sender"] = capture(self.pair.sender, ex.prompt.prefix_ids, model_id=self.pair.sender_id)
        if need_receiver and e["receiver"] is None:
            e["receiver"] = capture(self.pair.receiver, ex.prompt.prefix_ids, model_id=self.pair.receiver_id)
        return e["sender"], e["receiver"]

    def reference_hidden(self, ex: Example) -> torch.Tensor:
        """The receiver's own (full-prefill) final hidden states of the suffix: the output-error reference."""
        e = self._entry(ex)
        if e["ref"] is None:
            r = self.caches(ex, need_receiver=True)[1]
            e["ref"] = decode(self.pair.receiver, list(zip(r.keys, r.values)), ex.prompt.suffix_ids, 0).suffix_hidden
        return e["ref"]

    def run(self, plan: Plan, ex: Example) -> Decoded:
        """One plan on one example through the batch-1 executor (not stored)."""
        p = ex.prompt
        e = self._entry(ex)
        if plan.label == "full_prefill" and e["receiver"] is not None:
            r = e["receiver"]  # the receiver's own capture *is* its full prefill
            return decode(self.pair.receiver, list(zip(r.keys, r.values)), p.suffix_ids,
                          self.task.max_new_tokens, self.pair.stop_ids, stop=self.stop)
        needs_sender = plan.needs_sender
        sender_cache = self.caches(ex)[0] if needs_sender else None
        memo = None
        if needs_sender:  # recompute groups of one start share layers across plans; other kinds ignore it
            if e["memo"] is None:
                e["memo"] = GroupMemo(self.pair.receiver, p.prefix_ids, sender_cache)
            memo = e["memo"]
        return run_plan(self.pair.receiver, self.pair.sender, plan, p.prefix_ids, p.suffix_ids,
                        self.task.max_new_tokens, self.pair.stop_ids, sender_cache=sender_cache, memo=memo,
                        stop=self.stop)

    def _get(self, plan: str, example_id: str) -> dict | None:
        return self.store.get(plan, example_id) if self.store is not None else self._mem.get((plan, example_id))

    def missing(self, plan: Plan, ex: Example, out_err: bool = False) -> bool:
        """Not computed yet for this example's input, or computed before cells held the continuous
        signals (``nll``), or without the output error when it is asked for."""
        row = self._get(plan.name, ex.id)
        return (row is None or row.get("input") != ex.input_sha or "nll" not in row
                or (out_err and "out_err" not in row))

    def cell(self, plan: Plan, ex: Example, out_err: bool = False) -> dict:
        """One scored (plan, example) row, from the store if done before; ``out_err`` adds the relative
        L2 distance of the suffix's final hidden states from the receiver's full prefill."""
        if not self.missing(plan, ex, out_err):
            self.n_reused += 1
            self.n_cached += (plan.name, ex.id) not in self._fresh
            return self._get(plan.name, ex.id)
        self._fresh.add((plan.name, ex.id))
        self.compute([plan], [ex], out_err)
        return self._get(plan.name, ex.id)

    def compute(self, plans: list[Plan], examples: list[Example], out_err: bool = False, progress=None) -> None:
        """Compute and store the missing cells of plans x examples, ``batch_size`` examples at a time
        (shortest contexts together, so little is padding). Each plan's cells are stored as soon as the
        plan is done for the batch, and ``progress(n)`` is called then."""
        tok, task = self.pair.tokenizer, self.task
        todo = sorted((ex for ex in examples if any(self.missing(p, ex, out_err) for p in plans)),
                      key=lambda ex: len(ex.prompt.prefix_ids))
        for k in range(0, len(todo), self.batch_size):
            chunk = todo[k:k + self.batch_size]
            want = [(p, ex) for ex in chunk for p in plans if self.missing(p, ex, out_err)]
            need = [p for p in plans if any(q is p for q, _ in want)]
            items = [batched.Item(ex.prompt.prefix_ids, ex.prompt.suffix_ids,
                                  data.answer_ids(tok, task, ex.record["answers"][0])) for ex in chunk]
            index = {ex.id: i for i, ex in enumerate(chunk)}
            t0 = time.perf_counter()

            def store(plan: Plan, rows: list[dict]) -> None:  # each plan's cells as soon as it is done
                nonlocal t0
                secs, t0 = (time.perf_counter() - t0) / len(chunk), time.perf_counter()
                done = [(p, ex) for p, ex in want if p.name == plan.name]
                for p, ex in done:
                    r = rows[index[ex.id]]
                    pred = prediction_text(tok, r["tokens"])
                    row = {"plan": p.name, "id": ex.id, "n_recomputed": p.recompute_count,
                           "prediction": pred, "answers": ex.record["answers"], "score": score(task, pred, ex.record),
                           "metric": task.metric, "nll": round(r["nll"], 6), "kl": round(r["kl"], 6),
                           "seconds": round(secs, 4), "batch": len(chunk), "input": ex.input_sha}
                    if out_err:
                        row["out_err"] = r["out_err"]
                    self.n_run += 1
                    if self.store is not None:
                        self.store.add(row)
                    else:
                        self._mem[(p.name, ex.id)] = row
                if progress is not None:
                    progress(len(done))

            key = tuple((ex.id, ex.input_sha) for ex in chunk)  # an example's input may change (data, truncation)
            if self._batch is None or self._batch[0] != key:
                self._batch = None  # free the last batch's captures before making this one's
                self._batch = (key, batched.batch_context(self.pair.receiver, items, self.pair.pad_id,
                                                          task.max_new_tokens, self.pair.stop_ids, self.stop))
            batched.evaluate_plans(self.pair.receiver, self.pair.sender, items, need, self.pair.pad_id,
                                   task.max_new_tokens, self.pair.stop_ids, stop=self.stop, out_err=out_err,
                                   on_plan=store, context=self._batch[1])

    def fill(self, plans: list[Plan], examples: list[Example], out_err: bool = False, min_cells: int = 40,
             desc: str = "cells") -> None:
        """Compute the missing cells of plans x examples, with a live bar (cells done of total, rate, ETA).

        With ``workers > 1`` (and at least ``min_cells`` missing) examples are split between this
        process and ``workers - 1`` spawned ones sharing the cell file (each loads the pair from
        ``worker_cfg``); the bar counts their cells as they land in the file. Afterwards every cell
        is in the store, so the caller's ordinary loop only reads. Results do not depend on ``workers``.
        """
        from tqdm import tqdm

        missing = {(p.name, ex.id) for ex in examples for p in plans if self.missing(p, ex, out_err)}
        self._fresh |= missing  # computed below, by this process or a worker
        todo, n_cells = [ex for ex in examples if any((p.name, ex.id) in missing for p in plans)], len(missing)
        if not n_cells:
            return
        bar = tqdm(total=n_cells, desc=desc, unit="cell", dynamic_ncols=True)
        try:
            if self.workers <= 1 or self.worker_cfg is None or self.store is None or n_cells < min_cells:
                self.compute(plans, todo, out_err, progress=bar.update)
                return
            self._fill_parallel(plans, todo, out_err, bar)
        finally:
            bar.close()

    def _fill_parallel(self, plans: list[Plan], todo: list[Example], out_err: bool, bar) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        # contiguous shards of the length-sorted examples: each process batches similar lengths
        todo = sorted(todo, key=lambda ex: len(ex.prompt.prefix_ids))
        size = -(-len(todo) // self.workers)
        shards = [todo[i:i + size] for i in range(0, len(todo), size)]
        cfg = OmegaConf.to_container(self.worker_cfg, resolve=True)
        lines0 = self.store.line_count()
        own = 0

        def show(n: int = 0) -> None:  # every cell appended to the file since the start is one done
            nonlocal own
            own += n
            bar.n = min(bar.total, max(own, self.store.line_count() - lines0))
            bar.refresh()

        # a worker that dies (killed, out of memory) breaks the pool: its future raises instead of
        # leaving this process waiting forever; finished cells are in the file either way
        pool = ProcessPoolExecutor(self.workers - 1, mp_context=multiprocessing.get_context("spawn"))
        try:
            seed = None if self.store.seed_path is None else str(self.store.seed_path.parent)
            jobs = [pool.submit(fill_cells, cfg, str(self.store.path.parent), plans, [ex.id for ex in shard], out_err,
                                seed)
                    for shard in shards[1:] if shard]
            self.compute(plans, shards[0], out_err, progress=show)
            while wait(jobs, timeout=1.0).not_done:
                show()
            self.n_run += sum(j.result() for j in jobs)
            show()
        except BrokenProcessPool as e:
            raise RuntimeError(f"a cell worker process died ({e}); finished cells are kept in {self.store.path}, "
                               f"so rerunning the same command resumes (workers=1 runs in this process)") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        self.store.reload()


def fill_cells(cfg: dict, cells_dir: str, plans: list[Plan], example_ids: list[str], out_err: bool,
               seed_dir: str | None = None) -> int:
    """A worker process of Evaluator.fill: compute these cells into the pair's cell file in ``cells_dir``
    (cells already in ``seed_dir``'s file, the read-only seed, are not recomputed)."""
    cfg = OmegaConf.create(cfg)
    task = task_of(cfg)
    pair = load_pair_from(cfg)
    wanted = set(example_ids)
    examples = prepare(pair, task, [r for r in records_of(cfg, task) if r["_id"] in wanted], cfg.max_length)
    ev = Evaluator(pair, task, CellStore(Path(cells_dir), pair, task, cfg.split, cfg.max_length,
                                         seed=None if seed_dir is None else Path(seed_dir)),
                   batch_size=batch_size_of(cfg))
    ev.compute(plans, examples, out_err)
    return ev.n_run


def evaluator_for(cfg: DictConfig, pair: ModelPair, task: data.TaskSpec) -> tuple[list[Example], Evaluator]:
    """The examples of ``cfg``'s split and an Evaluator over the pair's cell store: the one way from a
    config to evaluated cells that every pipeline uses (workers and batch size from the config)."""
    examples = prepare(pair, task, records_of(cfg, task), cfg.max_length)
    ev = Evaluator(pair, task, cell_store(cfg, pair, task), workers=workers_of(cfg), worker_cfg=cfg,
                   batch_size=batch_size_of(cfg))
    return examples, ev


def batch_size_of(cfg: DictConfig) -> int:
    """Examples evaluated together (``batch_size``, default 8)."""
    b = cfg.get("batch_size") or 8
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise ValueError(f"batch_size must be a positive number of examples, got {b!r}")
    return b


# --------------------------------------------------------------------------------------------
# Run directories


def environment(device: str) -> dict:
    import transformers

    commit, dirty = None, None  # not a checkout (a non-editable install) or no git: unknown
    if in_checkout():
        try:
            head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=10)
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                    capture_output=True, text=True, timeout=10)
            if head.returncode == 0 and status.returncode == 0:
                commit, dirty = head.stdout.strip(), bool(status.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    dev = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else platform.processor() or platform.machine()
    from ds_study import __version__

    return {"ds_study": __version__, "git_commit": commit, "git_dirty": dirty, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "device": device,
            "device_name": dev, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def new_run_dir(root: str | Path, job: str, pair_name: str, dataset: str) -> Path:
    """A fresh directory per run: an earlier run's results are never overwritten."""
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    base = Path(root) / f"{stamp}_{job}_{pair_name}_{dataset}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for k in itertools.count():  # mkdir either creates or fails: parallel jobs of one second never share one
        path = base if k == 0 else Path(f"{base}_{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def start_run(cfg: DictConfig, job: str, task: data.TaskSpec) -> Path:
    run = new_run_dir(cfg.results_root, job, cfg.model_pair.name, task.name)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return run


def plans_of(cfg_plans, n_layers: int, cacheblend_ratio: float = 0.15) -> list[Plan]:
    """The plans of a config value: one plan (a name, "a-b,c-d", or one group list like [[2, 5]]) or
    a list of them. The one parser of plan lists (profile, evaluate, study)."""
    spec = OmegaConf.to_container(cfg_plans) if OmegaConf.is_config(cfg_plans) else cfg_plans
    if isinstance(spec, list) and spec and isinstance(spec[0], list) and spec[0] and isinstance(spec[0][0], int):
        specs = [spec]  # [[2, 5], [9, 9]]: one plan of two groups
    else:
        specs = spec if isinstance(spec, list) else [spec]
    return [parse_plan(s, n_layers, cacheblend_ratio=cacheblend_ratio) for s in specs]
