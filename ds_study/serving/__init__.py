"""The reference pipelined engine (paper §4.2) as a package; its public names are exported here."""

from ds_study.link import Link
from ds_study.serving.engine import (ALIASES, LOADERS, STRATEGIES, STREAMING, Arrivals, ArrivalCache, Engine,
                                     EngineError, EntryKey, EntryRejected, Item, KVStore, LayerClock, Request,
                                     RequestResult, SimJob, Span, StoreMiss, SuffixGraphs, TransferFailed,
                                     check_request, context_hash, entry_hasher, entry_key, error_line, execute,
                                     graphs_for, item_sources, model_identity, publish, reject_corrupt,
                                     repair_plan, resolve_strategy, simulate, sum_ttft, transfer_items)

__all__ = ["ALIASES", "LOADERS", "STRATEGIES", "STREAMING", "ArrivalCache", "Arrivals", "Engine", "EngineError",
           "EntryKey", "EntryRejected", "Item", "KVStore", "LayerClock", "Link", "Request", "RequestResult",
           "SimJob", "Span", "StoreMiss", "SuffixGraphs", "TransferFailed", "check_request", "context_hash",
           "entry_hasher", "entry_key", "error_line", "execute", "graphs_for", "item_sources", "model_identity",
           "publish", "reject_corrupt", "repair_plan", "resolve_strategy", "simulate", "sum_ttft", "transfer_items"]
