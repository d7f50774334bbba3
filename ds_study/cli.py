"""Command-line entry points: a user's mistake in one or two lines, a bug with its traceback.

Every Hydra entry point (``python -m ds_study.profile``, ``evaluate``, ``study``, ``zoo``) runs
through ``run``/``hydra_main``, which tells the two apart:

- *user errors* — a bad setting or override (Hydra: unknown key, unknown config group option,
  unparsable override; OmegaConf: a mandatory ``???`` value left unset), an invalid plan, an
  incompatible pair, a broken model family, a missing file, and any ``ValueError`` /
  ``FileNotFoundError`` that the project's own code raises with a message (its config checks) —
  print ``error: <what is wrong and what to do>`` and a hint, and exit with status 2;
- everything else is a bug and keeps its full traceback (exit status 1).

``--verbose`` (anywhere on the command line; removed before Hydra parses it) or
``HYDRA_FULL_ERROR=1`` shows the traceback of user errors too.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR / "conf"  # the Hydra configs ship with the package
VERBOSE_FLAG = "--verbose"
HINT = f"({VERBOSE_FLAG} or HYDRA_FULL_ERROR=1 shows the traceback)"
EXIT_USER_ERROR = 2

# exception classes of the project that always describe the user's input, never a bug (looked up
# by module and name so that this module imports none of them: they pull in torch and transformers)
USER_ERROR_CLASSES = {
    ("ds_study.executor", "PlanError"), ("ds_study.pair", "IncompatiblePair"),
    ("ds_study.arch", "UnsupportedArchitecture"), ("ds_study.pair", "CorruptCheckpoint"),
    ("ds_study.zoo", "ZooError"), ("ds_study.smol", "SmolError"),
    ("ds_study.data", "DatasetUnavailable"), ("ds_study.caches", "CacheChecksumError"),
}


def _is_project_error(ex: BaseException) -> bool:
    return any((c.__module__, c.__name__) in USER_ERROR_CLASSES for c in type(ex).__mro__)


def _raised_by_project(ex: BaseException) -> bool:
    """The innermost frame of the traceback is the project's own code: a ``raise`` with a message
    written for the user (a config check), not an error deep inside a library."""
    tb = ex.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)
    except OSError:
        return False


def _hydra_message(ex: BaseException) -> str:
    """Hydra's composition errors in one or two lines (its own text spans 6 to 20)."""
    lines = [ln.strip() for ln in str(ex).strip().splitlines()]
    first = lines[0] if lines else type(ex).__name__
    if first.startswith("Could not override") and len(lines) > 1:
        key = first.split("'")[1] if first.count("'") >= 2 else first
        return (f"unknown setting '{key.split('=')[0]}'. Check its spelling (`--cfg job` prints every setting); "
                f"{lines[1][0].lower() + lines[1][1:]}")
    if "Available options in" in str(ex):  # an unknown option of a config group: list the options
        head, _, rest = str(ex).partition("Available options in")
        options = [ln.strip() for ln in rest.split("Config search path")[0].splitlines()[1:] if ln.strip()]
        return f"{head.strip()}; available: {', '.join(options)}"
    override = getattr(ex, "override", None)  # OverrideParseException
    if override is not None:
        first = first.removeprefix("Error parsing override").strip()
        return (f"cannot parse the override {override!r} ({first}); write key=value, quote values with "
                f"special characters (https://hydra.cc/docs/advanced/override_grammar/basic)")
    cause = ex.__cause__
    detail = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
    return " ".join([first, *[ln for ln in lines[1:2] if not ln.startswith("See https")], detail]).strip()


def user_message(ex: BaseException) -> str | None:
    """What to tell the user, or None where ``ex`` is a bug (its traceback is shown)."""
    from hydra.errors import CompactHydraException
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    if isinstance(ex, CompactHydraException):
        return _hydra_message(ex)
    if isinstance(ex, MissingMandatoryValue):
        key = getattr(ex, "full_key", None) or "a setting"
        return f"{key} is not set (its value is ???): pass {key}=..."
    if isinstance(ex, InterpolationResolutionError):
        return str(ex).strip().splitlines()[0]
    if _is_project_error(ex):
        return str(ex).strip()
    if isinstance(ex, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)) \
            and _raised_by_project(ex):
        return str(ex).strip()
    return None


_state = {"verbose": False}  # set by run() for the task function it starts


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    print(HINT, file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


def run(start: Callable[[], object]) -> object:
    """Call ``start`` (it runs a ``hydra.main``-decorated function) with user errors reported in one or
    two lines. ``--verbose`` is taken off ``sys.argv`` here, before Hydra parses the command line."""
    verbose = VERBOSE_FLAG in sys.argv[1:]
    if verbose:
        sys.argv = [sys.argv[0], *[a for a in sys.argv[1:] if a != VERBOSE_FLAG]]
    verbose = _state["verbose"] = verbose or os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Hydra re-raises instead of printing its own (longer) report while HYDRA_FULL_ERROR is set
    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return start()
    except Exception as ex:  # noqa: BLE001 - sorted into user errors and bugs right here
        message = None if verbose else user_message(ex)
        if message is None:
            raise
        _fail(message)
    finally:
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


def guard_task(fn: Callable) -> Callable:
    """The task function itself reports user errors, so Hydra does not add its 'Error executing job'
    line; bugs pass through."""
    @functools.wraps(fn)
    def task(cfg):
        try:
            return fn(cfg)
        except Exception as ex:  # noqa: BLE001
            message = None if _state["verbose"] else user_message(ex)
            if message is None:
                raise
            _fail(message)
    return task


def hydra_main(config_name: str) -> Callable[[Callable], Callable[[], object]]:
    """``@hydra_main("profile")`` replaces ``@hydra.main(config_path=..., config_name="profile", ...)``
    on an entry point's ``cli(cfg)``: the same command line, with the error reporting above."""
    def decorate(fn: Callable) -> Callable[[], object]:
        @functools.wraps(fn)
        def entry() -> object:
            import hydra

            return run(lambda: hydra.main(config_path=str(CONF_DIR), config_name=config_name,
                                          version_base="1.3")(guard_task(fn))())
        return entry
    return decorate
