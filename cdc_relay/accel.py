"""Which implementation of the hot path runs: the Cython-compiled modules or pure Python.

The compiled modules are the very ``.py`` files listed in ``COMPILED``, compiled
by Cython when the package is built (``setup.py``); the ``.py`` files stay the
reference and the fallback. This module is the one place that decides which of
the two is imported, before any of them is (``cdc_relay/__init__.py`` installs
the finder below):

- ``CDC_RELAY_PURE_PYTHON=1`` forces pure Python;
- otherwise the compiled modules run only if every one of them was built, from
  exactly the source next to it (the build records each source's SHA-256 in
  ``MANIFEST``): a source edited since the build, or a partial build, runs pure
  Python rather than stale or mixed code;
- it is all or nothing, so ``implementation()`` has one answer.

Standard library only: ``setup.py`` reads ``COMPILED`` and ``MANIFEST`` from here
before anything else of the package can be imported.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Final

# The modules that buy something compiled: each cut at least 1% of the instructions per
# row alone (`python -m devtools.accel_bench --instructions --subsets`, docs/accelerator.md).
# Left pure: core, amqp/window, router (no gain: CPython 3.11's specialised attribute
# access is as fast as Cython's generic one) and amqp_wire (1%, and its recursive table
# encoder would no longer stop at Python's recursion limit: a difference of behaviour).
COMPILED: Final = (
    "cdc_relay.pg.walproto",
    "cdc_relay.pg.pgoutput",
    "cdc_relay.acks",
    "cdc_relay.rows",
    "cdc_relay.envelope",
)
PURE_ENV: Final = "CDC_RELAY_PURE_PYTHON"
MANIFEST: Final = "_accel_manifest.json"  # in the package directory, written by the build
COMPILED_NAME: Final = "compiled"
PURE_NAME: Final = "pure-python"
PACKAGE_DIR: Final = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class Choice:
    """The implementation that runs, and why (for ``status`` and the startup log line)."""

    implementation: str  # COMPILED_NAME or PURE_NAME
    reason: str
    extensions: Mapping[str, Path]  # module -> its compiled file (empty for pure Python)


def source_path(module: str, package_dir: Path = PACKAGE_DIR) -> Path:
    """The ``.py`` file of one of ``COMPILED`` (``cdc_relay.pg.walproto`` -> ``pg/walproto.py``)."""
    return package_dir.joinpath(*module.split(".")[1:]).with_suffix(".py")


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _extension(source: Path) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = source.with_name(source.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def decide(environ: Mapping[str, str], package_dir: Path = PACKAGE_DIR) -> Choice:
    """The rule: pure Python when asked for, or when any compiled module is missing or stale."""
    if environ.get(PURE_ENV, "") not in ("", "0"):
        return Choice(PURE_NAME, f"{PURE_ENV} is set", {})
    try:
        built = json.loads((package_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return Choice(PURE_NAME, "not compiled (no Cython or C compiler when it was built)", {})
    extensions: dict[str, Path] = {}
    for module in COMPILED:
        source = source_path(module, package_dir)
        extension = _extension(source)
        if extension is None or module not in built:
            return Choice(PURE_NAME, f"{module} was not compiled (a partial build)", {})
        if not source.is_file() or source_digest(source) != built[module]:
            rel = source.relative_to(package_dir.parent)
            return Choice(
                PURE_NAME, f"{rel} changed since it was compiled: rebuild to run compiled", {}
            )
        extensions[module] = extension
    return Choice(COMPILED_NAME, f"{len(extensions)} modules compiled by Cython", extensions)


_choice: Choice | None = None


def choice() -> Choice:
    """Decided once per process, the first time a compiled module or this is asked for."""
    global _choice
    if _choice is None:
        _choice = decide(os.environ)
    return _choice


def implementation() -> str:
    """``"compiled"`` or ``"pure-python"``: what ``status``, the log and the metric show."""
    return choice().implementation


class HotPathFinder(importlib.abc.MetaPathFinder):
    """Imports each module of the package from the file ``choice()`` picked.

    Without it Python would prefer an extension module next to a ``.py`` file of
    the same name, whatever the environment says, and would load one left over
    from an older build of a module no longer in ``COMPILED``.
    """

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("cdc_relay."):
            return None
        extension = choice().extensions.get(fullname)
        if extension is not None:
            loader = importlib.machinery.ExtensionFileLoader(fullname, str(extension))
            return importlib.util.spec_from_file_location(fullname, extension, loader=loader)
        source = source_path(fullname)
        if not source.is_file():  # a package (its __init__.py), or not ours to place
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, HotPathFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, HotPathFinder())
