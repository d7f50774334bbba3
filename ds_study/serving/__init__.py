"""The reference pipelined engine (paper §4.2): KV/E store, strategies, loaders, and the request executor.

DroidSpeak's receiver gets the sender's per-layer KV and the hidden state E at each transition
layer over a network, and its latency depends on how it loads them (``rules``: send_all,
send_reused, pipelined, and full_prefill / full_reuse at the two ends). One module per concept:

- ``store``     the shared KV/E store, entry keys and checksums;
- ``rules``     strategies, request checks, what the link carries, repair of rejected entries;
- ``timeline``  requests and their records (spans, results);
- ``simulate``  the unit-cost simulator of the rules (Fig. 13);
- ``arrivals``  what has reached the receiver, where loaders and the computation meet;
- ``graphs``    the final prompt pass as per-layer CUDA graphs;
- ``execute``   one request on the compute thread, with fallback and repair;
- ``loaders``   what moves the items: the ``Loader`` interface, its registry, and the thread,
                link worker process and torch.distributed loaders;
- ``engine``    the facade, ``Engine.run``;

and, for many requests under load (docs/serving.md):

- ``workload``  Poisson / gamma arrivals of paired sender and receiver requests;
- ``batch``     iteration-level batching: one decode step of every running request per forward;
- ``server``    the serving loop with both models, the shared store, strategies and faults;
- ``report``    TTFT / TPOT / ITL / E2E percentiles, throughput and goodput at an SLO;
- ``load_sim``  the serving loop as a discrete-event simulation (simpy), with measured costs;
- ``adapt``     runtime plan adaptation to load (paper §4.4) and to the measured bandwidth.

Every run records, per request and per layer, when loads and computation started and ended and
how long anything waited. The public names are exported here.
"""

from ds_study.link import Link
from ds_study.serving.arrivals import Arrivals
from ds_study.serving.engine import Engine
from ds_study.serving.errors import EngineError, EntryRejected, TransferFailed, error_line
from ds_study.serving.execute import ArrivalCache, LayerClock, execute
from ds_study.serving.graphs import SuffixGraphs, graphs_for
from ds_study.serving.loaders import LOADERS, Loader, LoaderUnavailable, create_loader, register_loader
from ds_study.serving.loaders.base import item_sources, reject_corrupt
from ds_study.serving.rules import (ALIASES, STRATEGIES, STREAMING, Item, check_request, repair_plan,
                                    resolve_strategy, transfer_items)
from ds_study.serving.simulate import SimJob, simulate
from ds_study.serving.store import (EntryKey, KVStore, StoreMiss, context_hash, entry_hasher, entry_key,
                                    model_identity, publish)
from ds_study.serving.timeline import Request, RequestResult, Span, sum_ttft

__all__ = ["ALIASES", "LOADERS", "STRATEGIES", "STREAMING", "ArrivalCache", "Arrivals", "Engine",
           "EngineError", "EntryKey", "EntryRejected", "Item", "KVStore", "LayerClock", "Link", "Loader",
           "LoaderUnavailable", "Request", "RequestResult", "SimJob", "Span", "StoreMiss", "SuffixGraphs",
           "TransferFailed", "check_request", "context_hash", "create_loader", "entry_hasher", "entry_key",
           "error_line", "execute", "graphs_for", "item_sources", "model_identity", "publish",
           "register_loader", "reject_corrupt", "repair_plan", "resolve_strategy", "simulate", "sum_ttft",
           "transfer_items"]
