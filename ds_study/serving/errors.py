"""The engine's failures, one class per way a request can go wrong, and how a reason is written.

Kept apart so that every layer (rules, arrivals, loaders, the facade) raises the same classes
without importing one another: a request is refused before any work (``EngineError``), its
transfer fails and it falls back to full prefill (``TransferFailed``), or an entry fails its
checksum and is recomputed (``EntryRejected``).
"""

from __future__ import annotations


class EngineError(ValueError):
    """A request the engine cannot run (unknown strategy, wrong model); raised before any work."""


class TransferFailed(RuntimeError):
    """The sender died, the link broke or an item did not arrive in time: fall back to full prefill."""


class EntryRejected(RuntimeError):
    """An entry failed its checksum on arrival; the receiver recomputes what it would have given.
    ``item``: the ``rules.Item`` whose entry it was."""

    def __init__(self, item, reason: str):
        super().__init__(f"{item.name}: {reason}")
        self.item = item


def error_line(e: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (just the type when the message is empty), for failure reasons."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit]}" if text else type(e).__name__
