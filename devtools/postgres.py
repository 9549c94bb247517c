"""A throwaway PostgreSQL cluster (wal_level=logical) in its own directory on a free port.

It can be stopped, crashed (``kill()``) and restarted on the same data without
touching any server already running on the machine. As root (CI) it runs as
the ``postgres`` OS user: ``initdb`` and ``postgres`` refuse root.

pytest-postgresql's executor was considered: it assumes a non-root user and
owns the process lifecycle in ways that make kill -9 plus a restart on the
same data directory awkward, and the demo must run outside pytest.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import math
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from devtools.pgbinaries import ensure_postgres, library_env
from devtools.procs import (
    LOOPBACK,
    MAX_SOCKET_PATH,
    Server,
    as_user,
    check_servers_allowed,
    chown_tree,
    cmdline,
    free_port,
    kill_tree,
    pid_alive,
    port_open,
    remaining,
    service_user,
    tail,
    wait_until,
    write_owned,
)

if TYPE_CHECKING:
    from devtools.tls import TlsFiles

__all__ = ["PostgresServer", "kill_postgres", "pg_bindir"]


def _postmaster_pid(data_dir: Path) -> int | None:
    """The live postmaster of ``data_dir``, or None (also for a stale pid file
    whose pid now belongs to some other process)."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    if not pid_alive(pid):
        return None
    args = cmdline(pid)
    if args is not None and os.fsencode(str(data_dir)) not in args.split(b"\0"):
        return None
    return pid


def _postmasters_by_cmdline(data_dir: Path) -> list[int]:
    """Live processes started as ``postgres -D data_dir``, found from /proc.

    A postmaster that pg_ctl forked but that has not yet written postmaster.pid
    (pg_ctl killed mid-start by a signal to our process group, or timed out) is
    invisible to the pid file; before this scan, cleanup then removed the
    directory and left that postmaster running.
    """
    wanted = os.fsencode(str(data_dir))
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        args = cmdline(int(entry.name))
        if args is None:
            continue
        pairs = itertools.pairwise(args.split(b"\0"))
        if (b"-D", wanted) in pairs and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def kill_postgres(data_dir: Path) -> list[int]:
    """SIGKILL the postmaster of ``data_dir`` and every backend; return survivors."""
    pids = set(_postmasters_by_cmdline(data_dir))
    pid = _postmaster_pid(data_dir)
    if pid is not None:
        pids.add(pid)
    return kill_tree(sorted(pids)) if pids else []


def pg_bindir() -> Path:
    """Directory of the PostgreSQL server binaries: CDC_RELAY_PG_BINDIR, else the
    newest /usr/lib/postgresql/*/bin, else ``pg_config --bindir``, else PATH."""
    override = os.environ.get("CDC_RELAY_PG_BINDIR")
    if override:
        return Path(override)

    def version(path: str) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in Path(path).parent.name.split("."))
        except ValueError:
            return (-1,)

    candidates = [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version)]
    candidates.reverse()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for candidate in candidates:
        if all((candidate / exe).exists() for exe in ("initdb", "pg_ctl", "postgres")):
            return candidate
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install them "
        "(scripts/ensure-servers.sh) or set CDC_RELAY_PG_BINDIR"
    )


def _pg_quote(value: str) -> str:
    """postgresql.conf value: any GUC accepts a quoted value, so quote unless
    the caller already did (``"'10s'"`` and ``"10s"`` both work)."""
    value = str(value)
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value
    return "'" + value.replace("'", "''") + "'"


class PostgresServer(Server):
    """A private Postgres cluster (wal_level=logical) on a free loopback port."""

    KIND = "pg"
    PREFIX = "cdc-relay-pg-"
    _MODES = ("smart", "fast", "immediate")

    def __init__(
        self,
        base_dir: Path | None = None,
        port: int | None = None,
        settings: dict[str, str] | None = None,
        *,
        version: int | None = None,
        ssl: TlsFiles | None = None,
    ) -> None:
        """``version`` (16, 17, 18) runs that major version from ``devtools.pgbinaries``
        instead of the system's server binaries. ``ssl`` turns TLS on and makes it
        mandatory: pg_hba.conf then has only ``hostssl`` lines for TCP, and rejects
        unencrypted connections with a clear error."""
        self._init_dir(base_dir)
        self.port: int = port or free_port()
        self.data_dir: Path = self.base_dir / "data"
        self.log_path: Path = self.base_dir / "postgres.log"
        self.version = version
        self._env: dict[str, str] = {}
        if version is None:
            self.bindir: Path = pg_bindir()
        else:
            home = ensure_postgres(version)
            self.bindir = home / "bin"
            self._env = library_env(home)
        self.user = service_user("CDC_RELAY_PG_USER", "postgres", required=True)
        socket_dir = self.base_dir / "s"
        self.socket_dir: Path | None = (
            socket_dir if len(str(socket_dir)) + 20 <= MAX_SOCKET_PATH else None
        )
        self.settings: dict[str, str] = {
            "wal_level": "logical",
            "max_replication_slots": "20",
            "max_wal_senders": "20",
            "listen_addresses": LOOPBACK,
            "port": str(self.port),
            # Too long a path would stop Postgres from starting: TCP only then.
            "unix_socket_directories": str(self.socket_dir or ""),
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "on",
            "wal_sender_timeout": "60s",
            "shared_buffers": "128MB",
            "max_connections": "100",
            "logging_collector": "off",
        }
        self.ssl = ssl
        if ssl is not None:
            self.settings.update(
                {
                    "ssl": "on",
                    "ssl_cert_file": str(self.base_dir / "server.pem"),
                    "ssl_key_file": str(self.base_dir / "server.key"),
                    "ssl_ca_file": str(self.base_dir / "ca.pem"),
                }
            )
        self.settings.update(settings or {})
        if "port" in (settings or {}):
            self.port = int(_pg_quote(self.settings["port"]).strip("'"))

    @property
    def dsn(self) -> str:
        """libpq URL of the ``postgres`` database; with TLS, verify-full against the CA."""
        dsn = f"postgresql://postgres@{LOOPBACK}:{self.port}/postgres"
        if self.ssl is not None:
            dsn += f"?sslmode=verify-full&sslrootcert={quote(str(self.ssl.ca))}"
        return dsn

    def __repr__(self) -> str:
        return f"PostgresServer(port={self.port}, base_dir={str(self.base_dir)!r})"

    def _run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """Run a Postgres tool as the server user; output is captured, never shown."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env.update(self._env)
        try:
            return subprocess.run(
                [*as_user(self.user), *args],
                capture_output=True,
                text=True,
                timeout=max(timeout, 1),
                cwd=self.base_dir,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"{Path(args[0]).name} timed out after {timeout:.0f}s\n{self.log_tail()}"
            ) from exc

    def _initdb(self, deadline: float) -> None:
        chown_tree(self.base_dir, self.user)
        result = self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",
            ],
            remaining(deadline),
        )
        (self.base_dir / "initdb.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise RuntimeError(
                f"initdb failed (exit {result.returncode}) in {self.data_dir}:\n"
                f"{result.stdout}{result.stderr}"
            )
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# cdc-relay devtools: rewritten on every start()\n")
            conf.write("include_if_exists 'cdc_relay.conf'\n")

    def _hba(self) -> str:
        """Trust on loopback (throwaway servers); with TLS, TCP only over TLS."""
        local = "local all all trust\nlocal replication all trust\n"
        if self.ssl is None:
            return (
                local + "host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n"
            )
        return (
            local + "hostnossl all all 0.0.0.0/0 reject\n"
            "hostnossl replication all 0.0.0.0/0 reject\n"
            "hostssl all all 127.0.0.1/32 trust\n"
            "hostssl replication all 127.0.0.1/32 trust\n"
        )

    def _write_settings(self) -> None:
        """Settings live in an included file, rewritten on each start so that a
        changed ``self.settings`` applies after restart()."""
        settings = {**self.settings, "port": str(self.port)}
        write_owned(self.data_dir / "pg_hba.conf", self._hba(), self.user)
        if self.ssl is not None:
            for name, source in (
                ("server.pem", self.ssl.server_cert),
                ("server.key", self.ssl.server_key),
                ("ca.pem", self.ssl.ca),
            ):
                write_owned(self.base_dir / name, source.read_bytes(), self.user, 0o600)
        lines = [f"{key} = {_pg_quote(value)}" for key, value in settings.items()]
        write_owned(self.data_dir / "cdc_relay.conf", "\n".join(lines) + "\n", self.user)
        if self.socket_dir is not None:
            self.socket_dir.mkdir(mode=0o700, exist_ok=True)
            chown_tree(self.socket_dir, self.user)

    def _remove_stale_locks(self) -> None:
        """After a kill the pid file (and socket lock) name a dead postmaster;
        if that pid is a zombie or was reused, Postgres would refuse to start."""
        pid_file = self.data_dir / "postmaster.pid"
        if pid_file.exists() and _postmaster_pid(self.data_dir) is None:
            pid_file.unlink(missing_ok=True)
            if self.socket_dir is not None:
                for lock in self.socket_dir.glob(".s.PGSQL.*"):
                    lock.unlink(missing_ok=True)

    def start(self, timeout: float = 30) -> None:
        """Start (initdb on first start only) and wait until it accepts connections."""
        check_servers_allowed("Postgres")
        deadline = time.monotonic() + timeout
        if self.is_running():
            self._wait_ready(deadline, timeout)  # e.g. still recovering from a crash
            return
        self._track()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(deadline)
        self._write_settings()
        self._remove_stale_locks()
        wait = max(1, math.ceil(remaining(deadline)))
        result = self._run(
            [
                str(self.bindir / "pg_ctl"),
                "start",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(wait),
            ],
            wait + 5,
        )
        if result.returncode != 0 or not self.is_running():
            raise RuntimeError(
                f"Postgres did not start on port {self.port} within {timeout:.0f}s: "
                f"{(result.stdout + result.stderr).strip()}\n--- {self.log_path}:\n"
                f"{self.log_tail()}"
            )

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        """Wait for the "ready" status pg_ctl -w waits for (postmaster.pid line 8)."""

        def ready() -> bool:
            with contextlib.suppress(OSError, IndexError):
                lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
                if lines[7].strip() == "ready" and port_open(self.port):
                    return True
            return not self.is_running()  # gone: stop waiting, and say so below

        if not wait_until(ready, deadline) or not self.is_running():
            raise RuntimeError(
                f"Postgres on port {self.port} not ready within {timeout:.0f}s\n{self.log_tail()}"
            )

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """``pg_ctl stop -m mode``; "immediate" is a crash (recovery on next start)."""
        if mode not in self._MODES:
            raise ValueError(f"mode must be one of {self._MODES}, not {mode!r}")
        if not self.is_running():
            return
        deadline = time.monotonic() + timeout
        wait = max(1, math.ceil(timeout))
        result = self._run(
            [
                str(self.bindir / "pg_ctl"),
                "stop",
                "-D",
                str(self.data_dir),
                "-m",
                mode,
                "-w",
                "-t",
                str(wait),
            ],
            wait + 5,
        )
        if not wait_until(lambda: not self.is_running(), deadline, 0.02):
            raise RuntimeError(
                f"Postgres did not stop ({mode}) within {timeout:.0f}s: "
                f"{(result.stdout + result.stderr).strip()}\n{self.log_tail()}"
            )

    def kill(self) -> None:
        """SIGKILL the postmaster and all its children: a hard crash."""
        survivors = kill_postgres(self.data_dir)
        if survivors:
            raise RuntimeError(f"Postgres processes survived SIGKILL: {survivors}")

    def reload(self) -> None:
        """Apply changed ``self.settings`` that need no restart (``pg_ctl reload``)."""
        self._write_settings()
        self._ctl("reload")

    def promote(self, timeout: float = 60) -> None:
        """Promote a standby to a primary and wait until it accepts writes."""
        self._ctl("promote", "-w", "-t", str(max(1, math.ceil(timeout))), timeout=timeout + 5)

    def _ctl(self, *args: str, timeout: float = 30) -> None:
        result = self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), *args], timeout)
        if result.returncode != 0:
            raise RuntimeError(
                f"pg_ctl {' '.join(args)} failed (exit {result.returncode}): "
                f"{(result.stdout + result.stderr).strip()}\n{self.log_tail()}"
            )

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        return _postmaster_pid(self.data_dir) is not None

    @property
    def postmaster_pid(self) -> int | None:
        """The live postmaster's pid (for CPU accounting and crash tests), or None."""
        return _postmaster_pid(self.data_dir)

    def log_tail(self, n: int = 50) -> str:
        if not self.log_path.exists() and (self.base_dir / "initdb.log").exists():
            return tail(self.base_dir / "initdb.log", n)
        return tail(self.log_path, n)

    def _stop_hard(self) -> None:
        """An immediate stop, then SIGKILL for whatever is left."""
        if self.is_running():
            with contextlib.suppress(Exception):
                self.stop("immediate", timeout=15)
        self.kill()

    def _stop_cleanly(self) -> None:
        self.stop("fast", timeout=10)
