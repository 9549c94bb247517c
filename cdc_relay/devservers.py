"""Throwaway Postgres and RabbitMQ servers for the demo, the tests and benchmarks.

Each server lives in its own temporary directory on free loopback ports, so it
can be crashed, killed and restarted on the same data without touching any
server already running on the machine. When run as root (CI), Postgres runs as
the ``postgres`` OS user (initdb and postgres refuse root) and RabbitMQ as the
``rabbitmq`` user, with the directories owned by them.

pytest-postgresql / pytest-rabbitmq executors were considered: they assume a
non-root user and own the process lifecycle in ways that make kill -9 plus a
restart on the same data directory awkward, and the demo must run outside
pytest; this module is small enough to own.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

_LIVE: set[Any] = set()


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_as(user: str) -> list[str]:
    """Command prefix that drops root to ``user``; empty when not root."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]


def _chown_tree(path: Path, user: str) -> None:
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no log at {path})"


def _wait_port(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def pg_bindir() -> Path:
    """Newest installed PostgreSQL binaries (or CDC_RELAY_PG_BINDIR)."""
    override = os.environ.get("CDC_RELAY_PG_BINDIR")
    if override:
        return Path(override)
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
    )
    if candidates:
        return Path(candidates[-1])
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise RuntimeError("PostgreSQL server binaries not found (run scripts/ensure-servers.sh)")


class PostgresServer:
    """A private Postgres cluster with wal_level=logical."""

    USER = "postgres"

    def __init__(
        self,
        base_dir: Path | None = None,
        port: int | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self._owns_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="cdc-relay-pg-"))
        self.port = port or free_port()
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_path = self.base_dir / "postgres.log"
        self.bindir = pg_bindir()
        self.settings = {
            "wal_level": "logical",
            "max_replication_slots": "20",
            "max_wal_senders": "20",
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "on",
            "wal_sender_timeout": "'60s'",
            "shared_buffers": "'128MB'",
            "max_connections": "100",
        }
        self.settings.update(settings or {})
        if self._owns_dir:
            _LIVE.add(self)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _cmd(self, *args: str) -> list[str]:
        return [*_run_as(self.USER), *args]

    def _initdb(self) -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        _chown_tree(self.base_dir, self.USER)
        subprocess.run(
            self._cmd(
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        conf = "\n".join(f"{k} = {v}" for k, v in self.settings.items())
        with (self.data_dir / "postgresql.conf").open("a") as f:
            f.write("\n# cdc-relay devservers\n" + conf + "\n")
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\n"
            "local replication all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "host replication all 127.0.0.1/32 trust\n"
        )
        _chown_tree(self.base_dir, self.USER)

    def start(self, timeout: float = 30) -> None:
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        if self.is_running():
            return
        with contextlib.suppress(FileNotFoundError):
            pid_file = self.data_dir / "postmaster.pid"
            pid = int(pid_file.read_text().splitlines()[0])
            if not _pid_alive(pid):
                # A crashed postmaster (possibly a zombie nobody reaps in a
                # container) leaves lock files that name its pid: remove them.
                pid_file.unlink()
                for lock in self.socket_dir.glob(".s.PGSQL.*"):
                    lock.unlink()
        result = subprocess.run(
            self._cmd(
                str(self.bindir / "pg_ctl"),
                "start",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(int(timeout)),
            ),
            capture_output=True,
            text=True,
            timeout=timeout + 10,
        )
        if result.returncode != 0 or not _wait_port(self.port, time.monotonic() + timeout):
            raise RuntimeError(
                f"Postgres did not start: {result.stderr.strip()}\n{self.log_tail()}"
            )

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        if not self.is_running():
            return
        subprocess.run(
            self._cmd(
                str(self.bindir / "pg_ctl"),
                "stop",
                "-D",
                str(self.data_dir),
                "-m",
                mode,
                "-w",
                "-t",
                str(int(timeout)),
            ),
            capture_output=True,
            timeout=timeout + 10,
        )
        if self.is_running():
            raise RuntimeError(f"Postgres did not stop ({mode})\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend: a hard crash."""
        pid = self._postmaster_pid()
        if pid is None:
            return
        children = _children(pid)
        for p in [pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_pid_alive(p) for p in [pid, *children]):
            time.sleep(0.02)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def _postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _pid_alive(pid) else None

    def is_running(self) -> bool:
        return self._postmaster_pid() is not None

    def log_tail(self, n: int = 50) -> str:
        return _tail(self.log_path, n)

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            if self.is_running():
                self.stop("immediate", timeout=20)
        with contextlib.suppress(Exception):
            self.kill()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        _LIVE.discard(self)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class RabbitServer:
    """A private RabbitMQ node: own node name, ports, data, logs and cookie."""

    USER = "rabbitmq"
    SCRIPTS = Path(os.environ.get("CDC_RELAY_RABBITMQ_SCRIPTS", "/usr/lib/rabbitmq/bin"))

    def __init__(
        self,
        base_dir: Path | None = None,
        port: int | None = None,
        dist_port: int | None = None,
        nodename: str | None = None,
    ) -> None:
        self._owns_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="cdc-relay-mq-"))
        self.port = port or free_port()
        self.dist_port = dist_port or free_port()
        self.nodename = nodename or f"cdcrelay-{uuid.uuid4().hex[:8]}@localhost"
        self.log_path = self.base_dir / "startup.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._home_marker = b"\x00-home\x00" + str(self.base_dir).encode() + b"\x00"
        self._user = self.USER if os.geteuid() == 0 else None
        if self._owns_dir:
            _LIVE.add(self)

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        base = self.base_dir
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(base),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(base / "rabbit.pid"),
            "RABBITMQ_LOGS": str(base / "log" / "rabbit.log"),
        }
        return env

    def _prepare(self) -> None:
        base = self.base_dir
        for sub in ("mnesia", "log"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        if not (base / "enabled_plugins").exists():
            (base / "enabled_plugins").write_text("[].\n")
            (base / "rabbitmq.conf").write_text(
                f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
            )
            (base / "advanced.config").write_text("[].\n")
            (base / "rabbitmq-env.conf").write_text("")
            cookie = base / ".erlang.cookie"
            cookie.write_text(uuid.uuid4().hex.upper())
            cookie.chmod(0o600)
        if self._user:
            _chown_tree(base, self._user)

    def _cmd(self, script: str, *args: str) -> list[str]:
        prefix = _run_as(self._user) if self._user else []
        return [*prefix, str(self.SCRIPTS / script), *args]

    def start(self, timeout: float = 60) -> None:
        if self.is_running():
            return
        self._prepare()
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            self._cmd("rabbitmq-server"),
            env=self._env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.base_dir,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"RabbitMQ exited during startup\n{self.log_tail()}")
            if _wait_port(self.port, min(deadline, time.monotonic() + 0.5)):
                try:
                    self.ctl("await_startup", timeout=max(5.0, deadline - time.monotonic()))
                    return
                except RuntimeError:
                    pass
        raise RuntimeError(f"RabbitMQ did not start in {timeout}s\n{self.log_tail()}")

    def ctl(self, *args: str, timeout: float = 60) -> str:
        result = subprocess.run(
            self._cmd("rabbitmqctl", "-n", self.nodename, *args),
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.base_dir,
        )
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def _beam_pids(self) -> list[int]:
        """OS processes of this node (found by its unique node name)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            # The node runs with `-home <base_dir>`: unique to this server.
            if b"beam" in cmdline and self._home_marker in cmdline:
                pids.append(int(entry.name))
        return pids

    def is_running(self) -> bool:
        return bool(self._beam_pids())

    def stop(self, timeout: float = 60) -> None:
        if not self.is_running():
            return
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.ctl("stop", timeout=timeout)
        deadline = time.monotonic() + timeout
        while self.is_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.is_running():
            self.kill()
        self._reap()

    def kill(self) -> None:
        pids = self._beam_pids()
        for pid in pids:
            for child in _children(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self._beam_pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, n: int = 50) -> str:
        parts = [_tail(self.log_path, n)]
        rabbit_log = self.base_dir / "log" / "rabbit.log"
        if rabbit_log.exists():
            parts.append(_tail(rabbit_log, n))
        return "\n".join(parts)

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.kill()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        _LIVE.discard(self)

    def __enter__(self) -> RabbitServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        if state == "Z":
            return False
    return True


def _children(pid: int) -> list[int]:
    """All descendants of pid (from /proc), so a crash can kill the whole tree."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().split(")")[-1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@atexit.register
def _cleanup_all() -> None:
    for server in list(_LIVE):
        server.cleanup()


def main() -> None:
    """Start both servers, print where they are, wait for Ctrl-C."""
    pg, mq = PostgresServer(), RabbitServer()
    try:
        pg.start()
        mq.start()
        print(f"CDC_RELAY_DSN={pg.dsn}")
        print(f"CDC_RELAY_AMQP_URL={mq.amqp_url}")
        print("servers are up; Ctrl-C to stop and remove them", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    finally:
        mq.cleanup()
        pg.cleanup()


if __name__ == "__main__":
    main()
