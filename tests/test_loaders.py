"""One interface for every loader, and a registry: a new transport is one class and one registry line.

A toy loader that hands every item over at once, synchronously when the run starts, is registered
from outside the package and serves requests through the engine exactly as the loader thread does."""

import pytest
import torch

from ds_study.serving import (Arrivals, Engine, EngineError, Link, Loader, LoaderUnavailable, Request,
                              register_loader)
from ds_study.serving.loaders import AUTO, LOADERS, loader_class, loader_names
from ds_study.serving.loaders.base import Run, item_sources
from ds_study.serving.store import context_hash
from test_engine import setup

torch.set_num_threads(1)


class SyncLoader(Loader):
    """Every item, verified against its checksum, handed over in ``start``: no link, no thread."""

    name = "sync"

    def stage(self, run: Run) -> list[Arrivals]:
        self.run = run
        self.arrivals = [Arrivals(job.items, 0.0) for job in run.jobs]
        return self.arrivals

    def start(self, t0: float) -> None:
        for job, arr in zip(self.run.jobs, self.arrivals):
            arr.t0 = t0
            ctx = context_hash(job.request.prefix_ids)
            for item in job.items:
                keys, _, _ = item_sources(self.run.store, job.request, item, ctx)
                tensors = tuple(self.run.store.get(k).clone() for k in keys)  # get() verifies the checksum
                arr.deliver(item, tensors, arr.now(), arr.now(), request=job.request.name)

    def finish(self, results) -> None:
        self.finished = len(results)


@pytest.fixture
def sync_loader():
    register_loader("sync", f"{__name__}:SyncLoader")  # the one registry line, by reference
    yield
    LOADERS.pop("sync")


@pytest.mark.parametrize("strategy,plan", [("send_all", "2-3"), ("send_reused", "1-2"), ("pipelined", "2-3"),
                                           ("pipelined", "0-1"), ("full_reuse", None), ("full_prefill", None)])
def test_a_registered_loader_serves_what_the_loader_thread_serves(sync_loader, strategy, plan):
    receiver, _, _, store, prefix, suffix = setup()
    reqs = [Request(name, receiver, "r", "s", plan, prefix, suffix, max_new_tokens=4, arrival=0.01 * i)
            for i, name in enumerate("AB")]
    thread = Engine(store, Link(gbps=0.05, chunk_bytes=1024), loader="thread").run(reqs, strategy)
    sync = Engine(store, Link(), loader="sync").run(reqs, strategy)
    for t, s in zip(thread, sync):
        assert s.fallback is None and s.rejected == []
        assert s.token_ids == t.token_ids and torch.equal(s.first_logits, t.first_logits)
        assert s.bytes_loaded == t.bytes_loaded
        assert s.loader == ("sync" if strategy != "full_prefill" else "")
        assert sorted((x.layer, x.kind) for x in s.spans if x.op == "load") == \
            sorted((x.layer, x.kind) for x in t.spans if x.op == "load")


def test_the_registry_imports_a_loader_only_when_asked_and_refuses_what_is_not_one(sync_loader):
    assert loader_names()[0] == "auto" and set(AUTO) <= set(LOADERS)
    assert "sync" in loader_names() and loader_class("sync") is SyncLoader
    with pytest.raises(ValueError, match="already registered"):
        register_loader("thread", SyncLoader)
    with pytest.raises(ValueError, match="module:Class"):
        register_loader("nowhere", "ds_study.serving")
    with pytest.raises(EngineError, match="unknown loader 'gpu'"):
        loader_class("gpu")
    register_loader("not_a_loader", "ds_study.serving:Engine")
    try:
        with pytest.raises(TypeError, match="not a Loader subclass"):
            loader_class("not_a_loader")
    finally:
        LOADERS.pop("not_a_loader")


def test_every_registered_loader_implements_the_interface():
    for name in LOADERS:
        cls = loader_class(name)
        assert cls.name == name and not getattr(cls, "__abstractmethods__", None), name


def test_a_loader_that_cannot_serve_a_run_is_refused_when_asked_for(sync_loader):
    class Picky(SyncLoader):
        name = "picky"

        def stage(self, run):
            raise LoaderUnavailable("only on Tuesdays")

    register_loader("picky", Picky)
    try:
        receiver, _, _, store, prefix, suffix = setup()
        req = Request("A", receiver, "r", "s", "2-3", prefix, suffix)
        with pytest.raises(EngineError, match="loader='picky' cannot serve this run: only on Tuesdays"):
            Engine(store, Link(), loader="picky").run([req], "pipelined")
    finally:
        LOADERS.pop("picky")


def test_the_distributed_loader_serves_one_request_per_connection():
    receiver, _, _, store, prefix, suffix = setup()
    reqs = [Request(n, receiver, "r", "s", "2-3", prefix, suffix) for n in "AB"]
    with pytest.raises(EngineError, match="one request"):
        Engine(None, None, loader="distributed", loader_options={"port": 1}).run(reqs, "pipelined")
