"""What every loader shares: reading an item's entries from the store and rejecting corrupt ones."""

from __future__ import annotations

from ds_study.serving.arrivals import Arrivals
from ds_study.serving.rules import Item
from ds_study.serving.store import EntryKey, KVStore, entry_key
from ds_study.serving.timeline import Request


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
