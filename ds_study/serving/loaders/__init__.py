"""The loader registry: names to ``Loader`` classes, imported only when a run asks for them.

In the manner of vLLM's ``KVConnectorFactory``: each entry is ``"module:Class"``, so registering
a loader imports nothing, and a new transport is one module (a ``Loader`` subclass, see
``loaders.base``) plus one line in ``LOADERS`` (or a ``register_loader`` call from outside the
package). ``Engine(loader="auto")`` tries ``AUTO`` in order.
"""

from __future__ import annotations

import importlib

from ds_study.serving.errors import EngineError
from ds_study.serving.loaders.base import Job, Loader, LoaderUnavailable, Run

LOADERS: dict[str, str | type[Loader]] = {
    "process": "ds_study.serving.loaders.process:ProcessLoader",  # the link worker process (host memory, CPU)
    "thread": "ds_study.serving.loaders.thread:ThreadLoader",  # a loader thread (CUDA copies, GPU entries)
    "distributed": "ds_study.serving.loaders.distributed:DistributedLoader",  # a sender process, torch.distributed
}
AUTO = ("process", "thread")  # loader="auto": the first that can serve the run


def loader_names() -> tuple[str, ...]:
    """What ``Engine(loader=...)`` accepts."""
    return ("auto", *LOADERS)


def register_loader(name: str, target: str | type[Loader]) -> None:
    """Add a loader under ``name``: a ``Loader`` subclass, or ``"module:Class"`` imported on first use."""
    if name in loader_names():
        raise ValueError(f"a loader named {name!r} is already registered")
    if isinstance(target, str) and ":" not in target:
        raise ValueError(f"a loader reference is 'module:Class', got {target!r}")
    LOADERS[name] = target


def loader_class(name: str) -> type[Loader]:
    """The class registered under ``name``, imported now if it was registered by reference."""
    if name not in LOADERS:
        raise EngineError(f"unknown loader {name!r}; use one of {', '.join(loader_names())}")
    target = LOADERS[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    if not (isinstance(target, type) and issubclass(target, Loader)):
        raise TypeError(f"loader {name!r} is {target!r}, not a Loader subclass")
    return target


def create_loader(name: str, **options) -> Loader:
    """A fresh loader for one run; ``options`` go to its constructor (a port, a backend, ...)."""
    return loader_class(name)(**options)


__all__ = ["AUTO", "LOADERS", "Job", "Loader", "LoaderUnavailable", "Run", "create_loader", "loader_class",
           "loader_names", "register_loader"]
