"""Builds the optional accelerator: the hot-path modules compiled by Cython (issue 20).

Everything else about the package is in pyproject.toml. The modules compiled are
``cdc_relay.accel.COMPILED``; their ``.py`` files stay in the package as the
reference and the fallback. Without Cython or a working C compiler the build
prints one line and installs pure Python (the Docker image checks that it got
the compiled modules).
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
ACCEL = runpy.run_path(str(ROOT / "cdc_relay" / "accel.py"))  # stdlib only, nothing else loads
# Type annotations are documentation here, never C types: compiled code must behave
# exactly like the .py it came from (int overflow, isinstance, None checks).
DIRECTIVES = {"language_level": 3, "annotation_typing": False, "binding": True}


def _degrade(why: str) -> None:
    print(f"cdc-relay: installing pure Python only (no compiled hot path): {why}", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """Compiles what it can; a failure leaves the pure-Python package, never a failed install."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = True  # one compiler per CPU: nine modules

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # a missing compiler surfaces as several distutils errors
            _degrade(f"{type(exc).__name__}: {exc}".splitlines()[0])
            return
        self._write_manifest()

    def _package_dir(self) -> Path:
        """Where the build puts ``cdc_relay`` (the source tree when built in place)."""
        first = ACCEL["COMPILED"][0]
        return Path(self.get_ext_fullpath(first)).parents[first.count(".") - 1]

    def _write_manifest(self) -> None:
        """Which source each extension was compiled from: cdc_relay.accel refuses stale ones."""
        digests = {
            module: ACCEL["source_digest"](ACCEL["source_path"](module, ROOT / "cdc_relay"))
            for module in ACCEL["COMPILED"]
        }
        manifest = self._package_dir() / ACCEL["MANIFEST"]
        manifest.write_text(json.dumps(digests, indent=1) + "\n")

    def get_outputs(self) -> list[str]:
        return [*super().get_outputs(), str(self._package_dir() / ACCEL["MANIFEST"])]


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
    return list(
        cythonize(modules, compiler_directives=DIRECTIVES, build_dir="build/cython", quiet=True)
    )


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
