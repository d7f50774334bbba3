"""The one interface every loader implements, and what loaders share.

A loader moves one engine run's items (transition E, reused layers' KV) to the receiver and fills
one ``Arrivals`` per request, while the engine computes on its own thread. The engine knows
loaders only through ``Loader`` and the registry (``ds_study.serving.loaders``), in the manner of
vLLM's ``KVConnectorBase_V1`` and ``KVConnectorFactory``: a new transport is one module with a
``Loader`` subclass and one registry line.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ds_study.link import Link
from ds_study.plans import Plan
from ds_study.serving.arrivals import Arrivals
from ds_study.serving.rules import Item
from ds_study.serving.store import EntryKey, KVStore, entry_key
from ds_study.serving.timeline import Request, RequestResult


class Loader(ABC):
    """What moves a run's items. The engine makes a fresh loader for each run (``create_loader``) and
    calls, in order:

    - ``stage(run)`` before the run's clock starts (set-up is not timed): get ready to move every
      job's items and return one ``Arrivals`` per job, in the run's order; raise
      ``LoaderUnavailable`` if this loader cannot serve this run (``loader="auto"`` tries the next);
    - ``start(t0)`` at the run's time zero (perf_counter ``t0``): set each Arrivals' ``t0``, move;
    - ``finish(results)`` after the last request, also when one raised. By then every request is
      cancelled or prefilled; release what the run held, waiting at most the run's timeout.

    A loader reports through the Arrivals only: ``deliver`` / ``reject`` / ``fail`` per item, and
    ``begin`` / ``advance`` where it can tell how much of an item is in (streaming E rows).
    """

    name: ClassVar[str] = ""  # its registry name; results report it (RequestResult.loader)

    @abstractmethod
    def stage(self, run: Run) -> list[Arrivals]:
        """Get ready to move ``run``'s items; one Arrivals per job, in order."""

    @abstractmethod
    def start(self, t0: float) -> None:
        """The run's clock starts now, at perf_counter time ``t0``."""

    @abstractmethod
    def finish(self, results: list[RequestResult]) -> None:
        """The run is over (``results``: the requests served, fewer than the jobs if one raised)."""


class LoaderUnavailable(Exception):
    """This loader cannot serve this run (raised by ``Loader.stage``, before anything moved).

    ``warn``: something is wrong (say so when falling back), not just a run this loader is not for.
    """

    warn = False


@dataclass
class Job:
    """One request of a run, checked: its strategy, its plan, and the items the link carries for it."""

    request: Request
    strategy: str
    plan: Plan
    items: list[Item]


@dataclass
class Run:
    """One engine run as a loader sees it: its jobs in arrival order, where the items come from and
    over which link, where they go, and how long any wait may take."""

    jobs: list[Job]
    store: KVStore | None
    link: Link | None
    device: torch.device | None = None  # None: where the entries are
    verify: bool = True  # checksum every entry on the way
    timeout_s: float = 30.0

    @property
    def on_cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"


def item_sources(store: KVStore, req: Request, item: Item, ctx: str) -> tuple[list, list, list]:
    """An item's store keys, its tensors as stored (unverified: the loader checksums them on the
    link) and the checksums they must match."""
    keys = [entry_key(req.sender, req.receiver, ctx, item.layer, k) for k in item.entry_kinds()]
    return keys, [store.get(k, verify=False) for k in keys], [store.checksum(k) for k in keys]


def reject_corrupt(store: KVStore, arr: Arrivals, item: Item, bad: list[EntryKey], nbytes: int) -> None:
    """Entries whose bytes failed their checksum on the link: reread them for later requests, reject the item."""
    for k in bad:
        store.reread(k)
    arr.reject(item, f"entry {item.name} is corrupt (checksum mismatch); rejected", nbytes)
