"""Builds the optional accelerator: the hot-path modules compiled by Cython (issue 20).

Everything else about the package is in pyproject.toml. The modules compiled are
``cdc_relay.accel.COMPILED``; their ``.py`` files stay in the package as the
reference and the fallback. Without Cython or a working C compiler the build
prints one line and installs pure Python; ``CDC_RELAY_REQUIRE_COMPILED=1``
(the Docker image's build) makes that an error instead.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
ACCEL = runpy.run_path(str(ROOT / "cdc_relay" / "accel.py"))  # stdlib only, nothing else loads
REQUIRE_ENV = "CDC_RELAY_REQUIRE_COMPILED"
# Type annotations are documentation here, never C types: compiled code must behave
# exactly like the .py it came from (int overflow, isinstance, None checks).
DIRECTIVES = {"language_level": 3, "annotation_typing": False, "binding": True}


def _required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def _degrade(why: str) -> None:
    if _required():
        raise SystemExit(f"cdc-relay: {REQUIRE_ENV} is set but the accelerator cannot be built: {why}")
    print(f"cdc-relay: installing pure Python only (no compiled hot path): {why}", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """Compiles what it can; a failure leaves the pure-Python package, never a failed install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # a missing compiler surfaces as several distutils errors
            _degrade(f"{type(exc).__name__}: {exc}".splitlines()[0])
            return
        self._write_manifest()

    def _write_manifest(self) -> None:
        """Which source each extension was compiled from: cdc_relay.accel refuses stale ones."""
        digests = {
            module: ACCEL["source_digest"](ACCEL["source_path"](module, ROOT / "cdc_relay"))
            for module in ACCEL["COMPILED"]
        }
        first = Path(self.get_ext_fullpath(ACCEL["COMPILED"][0]))
        package_dir = first.parents[len(ACCEL["COMPILED"][0].split(".")) - 2]
        for target in {package_dir, ROOT / "cdc_relay"} if self.inplace else {package_dir}:
            (target / ACCEL["MANIFEST"]).write_text(json.dumps(digests, indent=1) + "\n")

    def get_outputs(self) -> list[str]:
        outputs = list(super().get_outputs())
        first = Path(self.get_ext_fullpath(ACCEL["COMPILED"][0]))
        package_dir = first.parents[len(ACCEL["COMPILED"][0].split(".")) - 2]
        return [*outputs, str(package_dir / ACCEL["MANIFEST"])]


def _extensions() -> list[Any]:
    try:
        from Cython.Build import cythonize
    except ImportError:
        _degrade("Cython is not installed")
        return []
    modules = [
        Extension(module, [str(ACCEL["source_path"](module, Path("cdc_relay")))])
        for module in ACCEL["COMPILED"]
    ]
    return list(cythonize(modules, compiler_directives=DIRECTIVES, build_dir="build/cython", quiet=True))


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
