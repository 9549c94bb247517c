"""Throwaway Postgres and RabbitMQ servers for the demo, the tests and benchmarks.

Each server lives in its own directory on free loopback ports, so it can be
stopped, crashed (``kill()``) and restarted on the same data without touching
any server already running on the machine. As root (CI), Postgres runs as the
``postgres`` OS user (``initdb`` and ``postgres`` refuse root) and RabbitMQ as
the ``rabbitmq`` user, with their directories owned by those users.

Servers must not outlive the Python process that started them: an ``atexit``
hook cleans them up on a normal exit, and a tiny watchdog child process kills
them (and removes temporary directories) when this process dies without
running ``atexit`` (SIGTERM, SIGKILL, OOM).

pytest-postgresql / pytest-rabbitmq executors were considered: they assume a
non-root user and own the process lifecycle in ways that make kill -9 plus a
restart on the same data directory awkward, and the demo must run outside
pytest; this module is small enough to own. ``python -m cdc_relay.devservers``
starts both servers for manual experiments.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import math
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["PostgresServer", "RabbitServer", "free_port", "pg_bindir"]

LOOPBACK = "127.0.0.1"
# RabbitMQ's Debian scripts (not the /usr/sbin wrapper, which `su`s by itself).
RABBITMQ_SCRIPTS = Path(os.environ.get("CDC_RELAY_RABBITMQ_SCRIPTS", "/usr/lib/rabbitmq/bin"))
# Unix socket paths are limited to 107 bytes (sun_path).
_MAX_SOCKET_PATH = 100


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _free_ports(count: int) -> list[int]:
    """Distinct free ports: successive free_port() calls may return the same one."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOOPBACK, port)) == 0


def _service_user(env_var: str, default: str, required: bool) -> str | None:
    """The OS user a server runs as: ourselves (None) unless we are root.

    Postgres refuses to run as root, so a missing user is an error there;
    RabbitMQ runs fine as root, so it falls back to root.
    """
    if os.geteuid() != 0:
        return None
    name = os.environ.get(env_var, default)
    try:
        pwd.getpwnam(name)
    except KeyError:
        if required:
            raise RuntimeError(
                f"running as root: need an unprivileged OS user {name!r} to run the "
                f"server (create it, or set {env_var})"
            ) from None
        return None
    return name


def _as_user(user: str | None) -> list[str]:
    """Command prefix that drops root to ``user``, keeping our environment."""
    if user is None:
        return []
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]
    return ["runuser", "-p", "-u", user, "--"]


def _chown_tree(path: Path, user: str | None) -> None:
    """Give ``path`` (recursively, never following symlinks) to ``user``."""
    if user is None:
        return
    entry = pwd.getpwnam(user)
    os.lchown(path, entry.pw_uid, entry.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


def _write(path: Path, text: str, user: str | None, mode: int | None = None) -> None:
    """Write a file the server user owns (and may read when mode is 0600)."""
    path.write_text(text)
    if mode is not None:
        path.chmod(mode)
    _chown_tree(path, user)


def _tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(lines[-n:])


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


# --------------------------------------------------------------------------- processes


def _pid_alive(pid: int) -> bool:
    """Alive and not a zombie: killed servers are reparented to a PID 1 that
    may never reap them, and a zombie must not count as a running server."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def _descendants(pid: int) -> list[int]:
    """All descendants of ``pid`` (from /proc), so a crash takes the whole tree."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(pids: list[int], timeout: float = 10) -> list[int]:
    """SIGKILL each process and its descendants; return the ones still alive.

    Each root is stopped first so it cannot fork a child we would miss.
    """
    victims: list[int] = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        victims += [pid, *_descendants(pid)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in victims if _pid_alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


def _postmaster_pid(data_dir: Path) -> int | None:
    """The live postmaster of ``data_dir``, or None (also for a stale pid file
    whose pid now belongs to some other process)."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    if not _pid_alive(pid):
        return None
    cmdline = _cmdline(pid)
    if cmdline is not None and os.fsencode(str(data_dir)) not in cmdline.split(b"\0"):
        return None
    return pid


def _kill_postgres(data_dir: Path) -> list[int]:
    """SIGKILL the postmaster of ``data_dir`` and every backend; return survivors."""
    pid = _postmaster_pid(data_dir)
    return [] if pid is None else _kill_tree([pid])


def _rabbit_pids(base_dir: Path) -> list[int]:
    """Beam processes of the node living in ``base_dir``.

    The node runs with HOME=base_dir, and erl passes ``-home <HOME>`` to beam:
    unique to this server, unlike the node name (reused across instances).
    """
    marker = b"\0-home\0" + os.fsencode(str(base_dir)) + b"\0"
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        cmdline = _cmdline(pid)
        if cmdline and b"beam" in cmdline.split(b"\0", 1)[0] and marker in cmdline:
            pids.append(pid)
    return [pid for pid in pids if _pid_alive(pid)]


def _kill_rabbit(base_dir: Path) -> list[int]:
    """SIGKILL the node in ``base_dir`` and its port programs; return survivors."""
    pids = _rabbit_pids(base_dir)
    return _kill_tree(pids) if pids else []


# --------------------------------------------------------------------------- lifetime


class _Guardian:
    """A watchdog child that kills our servers when this process dies.

    It reads registrations from a pipe; EOF means we are gone, however we
    died, and it then kills what is still registered. It runs in its own
    session so Ctrl-C in a terminal does not reach it.
    """

    _lock = threading.Lock()
    _proc: subprocess.Popen[bytes] | None = None
    _owner = 0

    @classmethod
    def send(cls, op: str, kind: str, base_dir: Path, owned: bool) -> None:
        line = f"{op}\t{kind}\t{base_dir}\t{int(owned)}\n".encode()
        with cls._lock:
            proc = cls._proc
            if proc is None or cls._owner != os.getpid() or proc.poll() is not None:
                if op == "-":
                    return
                proc = cls._spawn()
            assert proc.stdin is not None
            with contextlib.suppress(OSError):
                proc.stdin.write(line)
                proc.stdin.flush()

    @classmethod
    def _spawn(cls) -> subprocess.Popen[bytes]:
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH", "")) if p
        )
        cls._proc = subprocess.Popen(
            [sys.executable, "-c", "from cdc_relay.devservers import _guardian; _guardian()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            env=env,
            start_new_session=True,
        )
        cls._owner = os.getpid()
        return cls._proc


def _guardian() -> None:
    """Body of the watchdog process (see _Guardian)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    live: dict[str, tuple[str, bool]] = {}
    for raw in sys.stdin:
        with contextlib.suppress(ValueError):
            op, kind, path, owned = raw.rstrip("\n").split("\t")
            if op == "+":
                live[path] = (kind, owned == "1")
            else:
                live.pop(path, None)
    for path, (kind, owned) in live.items():
        with contextlib.suppress(Exception):
            if kind == "pg":
                _kill_postgres(Path(path) / "data")
            else:
                _kill_rabbit(Path(path))
        if owned:
            shutil.rmtree(path, ignore_errors=True)


class _Tracked:
    """Registration of started servers with atexit and the guardian."""

    _KIND = ""
    base_dir: Path
    _owns_dir: bool
    _tracked_by = 0

    def _track(self) -> None:
        if self._tracked_by == os.getpid():
            return
        self._tracked_by = os.getpid()
        _LIVE.add(self)
        _Guardian.send("+", self._KIND, self.base_dir, self._owns_dir)

    def _untrack(self) -> None:
        if self._tracked_by == os.getpid():
            _Guardian.send("-", self._KIND, self.base_dir, self._owns_dir)
        self._tracked_by = 0
        _LIVE.discard(self)

    def _at_exit(self) -> None:
        raise NotImplementedError


_LIVE: set[_Tracked] = set()


@atexit.register
def _cleanup_all() -> None:
    """Stop every server this process started (not a forked child's copies)."""
    for server in list(_LIVE):
        if server._tracked_by == os.getpid():
            with contextlib.suppress(Exception):
                server._at_exit()


# --------------------------------------------------------------------------- Postgres


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


class PostgresServer(_Tracked):
    """A private Postgres cluster (wal_level=logical) on a free loopback port."""

    _KIND = "pg"
    _MODES = ("smart", "fast", "immediate")

    def __init__(
        self,
        base_dir: Path | None = None,
        port: int | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        # Only a directory we made ourselves is removed by cleanup().
        self._owns_dir = base_dir is None
        if base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="cdc-relay-pg-"))
        else:
            self.base_dir = Path(base_dir).absolute()
            self.base_dir.mkdir(parents=True, exist_ok=True)
        self.port: int = port or free_port()
        self.data_dir: Path = self.base_dir / "data"
        self.log_path: Path = self.base_dir / "postgres.log"
        self.bindir: Path = pg_bindir()
        self.user = _service_user("CDC_RELAY_PG_USER", "postgres", required=True)
        socket_dir = self.base_dir / "s"
        self.socket_dir: Path | None = (
            socket_dir if len(str(socket_dir)) + 20 <= _MAX_SOCKET_PATH else None
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
        self.settings.update(settings or {})
        if "port" in (settings or {}):
            self.port = int(_pg_quote(self.settings["port"]).strip("'"))

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/postgres"

    def __repr__(self) -> str:
        return f"PostgresServer(port={self.port}, base_dir={str(self.base_dir)!r})"

    def _run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """Run a Postgres tool as the server user; output is captured, never shown."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        try:
            return subprocess.run(
                [*_as_user(self.user), *args],
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
        _chown_tree(self.base_dir, self.user)
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
            _remaining(deadline),
        )
        (self.base_dir / "initdb.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise RuntimeError(
                f"initdb failed (exit {result.returncode}) in {self.data_dir}:\n"
                f"{result.stdout}{result.stderr}"
            )
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# cdc-relay devservers: rewritten on every start()\n")
            conf.write("include_if_exists 'cdc_relay.conf'\n")
        _write(
            self.data_dir / "pg_hba.conf",
            "local all all trust\n"
            "local replication all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "host replication all 127.0.0.1/32 trust\n",
            self.user,
        )

    def _write_settings(self) -> None:
        """Settings live in an included file, rewritten on each start so that a
        changed ``self.settings`` applies after restart()."""
        settings = {**self.settings, "port": str(self.port)}
        lines = [f"{key} = {_pg_quote(value)}" for key, value in settings.items()]
        _write(self.data_dir / "cdc_relay.conf", "\n".join(lines) + "\n", self.user)
        if self.socket_dir is not None:
            self.socket_dir.mkdir(mode=0o700, exist_ok=True)
            _chown_tree(self.socket_dir, self.user)

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
        deadline = time.monotonic() + timeout
        if self.is_running():
            self._wait_ready(deadline, timeout)  # e.g. still recovering from a crash
            return
        self._track()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(deadline)
        self._write_settings()
        self._remove_stale_locks()
        wait = max(1, math.ceil(_remaining(deadline)))
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
        while True:
            with contextlib.suppress(OSError, IndexError):
                lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
                if lines[7].strip() == "ready" and _port_open(self.port):
                    return
            if not self.is_running() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"Postgres on port {self.port} not ready within {timeout:.0f}s\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

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
        while self.is_running() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.is_running():
            raise RuntimeError(
                f"Postgres did not stop ({mode}) within {timeout:.0f}s: "
                f"{(result.stdout + result.stderr).strip()}\n{self.log_tail()}"
            )

    def kill(self) -> None:
        """SIGKILL the postmaster and all its children: a hard crash."""
        survivors = _kill_postgres(self.data_dir)
        if survivors:
            raise RuntimeError(f"Postgres processes survived SIGKILL: {survivors}")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        return _postmaster_pid(self.data_dir) is not None

    def log_tail(self, n: int = 50) -> str:
        if not self.log_path.exists() and (self.base_dir / "initdb.log").exists():
            return _tail(self.base_dir / "initdb.log", n)
        return _tail(self.log_path, n)

    def cleanup(self) -> None:
        """Stop (immediate, then SIGKILL if needed) and remove a temporary base_dir."""
        try:
            if self.is_running():
                with contextlib.suppress(Exception):
                    self.stop("immediate", timeout=15)
            with contextlib.suppress(Exception):
                self.kill()
        finally:
            if self._owns_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)
            self._untrack()

    def _at_exit(self) -> None:
        if self._owns_dir:
            self.cleanup()
            return
        # A caller-provided data directory is kept: shut it down cleanly.
        try:
            self.stop("fast", timeout=10)
        finally:
            self.cleanup()

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# --------------------------------------------------------------------------- RabbitMQ

# The listeners, the distribution port and the CLI's own node all bind to all
# interfaces unless told otherwise.
_ERL_LOOPBACK_ARGS = "-kernel inet_dist_use_interface {127,0,0,1}"
_STARTED_MARKER = b"Server startup complete"


def _rabbit_app_closure(plugins: Path) -> dict[str, Path] | None:
    """Application dirs the broker needs (rabbit and its dependencies) from the
    plugins dir, or None when the layout is not the one we know."""
    apps: dict[str, Path] = {}
    for entry in plugins.iterdir():
        if entry.is_dir() and (entry / "ebin").is_dir():
            apps[entry.name.rsplit("-", 1)[0]] = entry
    if "rabbit" not in apps or "rabbitmq_prelaunch" not in apps:
        return None
    needed: dict[str, Path] = {}
    todo = ["rabbit", "rabbitmq_prelaunch"]
    while todo:
        name = todo.pop()
        if name in needed or name not in apps:  # not a plugin: an OTP application
            continue
        needed[name] = apps[name]
        try:
            app_file = (apps[name] / "ebin" / f"{name}.app").read_text(errors="replace")
        except OSError:
            return None
        match = re.search(r"\{applications,\s*\[([^\]]*)\]", app_file)
        if match:
            todo += [dep.strip() for dep in match.group(1).split(",") if dep.strip()]
    return needed


class RabbitServer(_Tracked):
    """A private RabbitMQ node: own node name, ports, data, logs and cookie."""

    _KIND = "mq"

    def __init__(
        self,
        base_dir: Path | None = None,
        port: int | None = None,
        dist_port: int | None = None,
        nodename: str | None = None,
    ) -> None:
        self._owns_dir = base_dir is None
        if base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="cdc-relay-mq-"))
        else:
            self.base_dir = Path(base_dir).absolute()
            self.base_dir.mkdir(parents=True, exist_ok=True)
        ports = _free_ports(2)
        self.port: int = port or ports[0]
        self.dist_port: int = dist_port or next(p for p in ports if p != self.port)
        # Mnesia data is per node name: reuse the one this base_dir was made with.
        saved = self.base_dir / "nodename"
        if nodename is None and saved.exists():
            nodename = saved.read_text().strip() or None
        self.nodename: str = nodename or f"cdcrelay-{uuid.uuid4().hex[:10]}@localhost"
        self.user = _service_user("CDC_RELAY_RABBITMQ_USER", "rabbitmq", required=False)
        self.log_path: Path = self.base_dir / "log" / "rabbit.log"
        self.stdout_path: Path = self.base_dir / "stdout.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._home: Path | None = None

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@{LOOPBACK}:{self.port}/"

    def __repr__(self) -> str:
        return f"RabbitServer(port={self.port}, nodename={self.nodename!r})"

    def _prepare(self) -> None:
        base = self.base_dir
        for sub in ("mnesia", "log"):
            (base / sub).mkdir(exist_ok=True)
        (base / "nodename").write_text(self.nodename + "\n")
        # No plugins (management would double the boot time).
        (base / "enabled_plugins").write_text("[].\n")
        cookie = base / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o600)
        self._home = self._trimmed_home()
        _chown_tree(base, self.user)

    def _trimmed_home(self) -> Path | None:
        """A RABBITMQ_HOME whose plugins dir holds only what the broker needs.

        At boot RabbitMQ loads every module of every application in its plugins
        dir to find boot steps; keeping only rabbit's dependencies (20 of 64
        applications in 3.10) halves the boot time here (about 9 s to 4.5 s).
        Set CDC_RELAY_RABBITMQ_ALL_PLUGINS=1 to use the stock layout.
        """
        if os.environ.get("CDC_RELAY_RABBITMQ_ALL_PLUGINS"):
            return None
        home = self.base_dir / "rabbitmq-home"
        if (home / "plugins").is_dir():
            return home
        real = Path(os.path.realpath(RABBITMQ_SCRIPTS / "rabbitmq-server")).parent.parent
        if not all((real / sub).is_dir() for sub in ("sbin", "escript", "plugins")):
            return None
        apps = _rabbit_app_closure(real / "plugins")
        if apps is None:
            return None
        (home / "plugins").mkdir(parents=True)
        for sub in ("sbin", "escript"):
            (home / sub).symlink_to(real / sub)
        for path in apps.values():
            (home / "plugins" / path.name).symlink_to(path)
        return home

    def _env(self) -> dict[str, str]:
        base = self.base_dir
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": str(base),  # the Erlang cookie lives here, for server and CLI
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_LOGS": str(self.log_path),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            # Keep the system's /etc/rabbitmq files out; none exist here by
            # default (no config file also skips the slow cuttlefish step), but
            # a rabbitmq.conf dropped into base_dir before start() is used.
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(base / "rabbit.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": _ERL_LOOPBACK_ARGS,
            "RABBITMQ_CTL_ERL_ARGS": _ERL_LOOPBACK_ARGS,
            "ERL_EPMD_ADDRESS": LOOPBACK,  # only used if epmd is not running yet
        }
        if self._home is not None:
            env["RABBITMQ_SCRIPTS_DIR"] = str(self._home / "sbin")
        return env

    def _cmd(self, script: str, *args: str) -> list[str]:
        return [*_as_user(self.user), str(RABBITMQ_SCRIPTS / script), *args]

    def start(self, timeout: float = 60) -> None:
        """Boot the node in the background and wait until the broker app runs."""
        deadline = time.monotonic() + timeout
        if self.is_running():
            return
        self._reap()
        self._prepare()
        self._track()
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.stdout_path.open("ab") as out:
            self._proc = subprocess.Popen(
                self._cmd("rabbitmq-server"),
                env=self._env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.base_dir,
                start_new_session=True,
            )
        try:
            self._wait_started(offset, deadline, timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                self.kill()
            raise

    def _wait_started(self, log_offset: int, deadline: float, timeout: float) -> None:
        """Ready = AMQP port answers and the log says startup completed (the
        listener opens just before the last boot steps). Falls back to
        ``rabbitmqctl await_startup`` if the log line does not show up."""
        assert self._proc is not None
        port_since: float | None = None
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"RabbitMQ node {self.nodename} exited with code {code} during startup\n"
                    f"{self.log_tail()}"
                )
            if port_since is None and _port_open(self.port):
                port_since = time.monotonic()
            if port_since is not None:
                if self._log_since(log_offset).find(_STARTED_MARKER) >= 0:
                    return
                if time.monotonic() - port_since > 3:
                    self.ctl("await_startup", timeout=max(1.0, _remaining(deadline)))
                    return
            time.sleep(0.05)
        raise RuntimeError(
            f"RabbitMQ node {self.nodename} did not start within {timeout:.0f}s\n{self.log_tail()}"
        )

    def _log_since(self, offset: int) -> bytes:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read()
        except OSError:
            return b""

    def stop(self, timeout: float = 60) -> None:
        """Clean ``rabbitmqctl stop``, then wait for the OS process to exit."""
        if not self.is_running():
            self._reap()
            return
        deadline = time.monotonic() + timeout
        error = ""
        try:
            self.ctl("stop", timeout=timeout)
        except RuntimeError as exc:
            error = str(exc)
        while self.is_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.is_running():
            self.kill()
            raise RuntimeError(
                f"RabbitMQ node {self.nodename} did not stop within {timeout:.0f}s "
                f"(killed it) {error}\n{self.log_tail()}"
            )
        self._reap()

    def kill(self) -> None:
        """SIGKILL the beam process and its port programs: a hard crash.

        Like any RabbitMQ 3.10 crash, this can lose a queue declaration made
        just before (seen ~1 in 10 under load, 0.1 s after declaring), and
        with it the queue's confirmed messages; crash tests should declare
        their topology well before killing (or after a clean restart).
        """
        survivors = _kill_rabbit(self.base_dir)
        self._reap()
        if survivors:
            raise RuntimeError(f"RabbitMQ processes survived SIGKILL: {survivors}")

    def _reap(self) -> None:
        """Collect our exited child so it does not linger as a zombie."""
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
                self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def is_running(self) -> bool:
        return bool(_rabbit_pids(self.base_dir))

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """Run rabbitmqctl against this node; stdout, or RuntimeError with stderr."""
        if self._home is None and self.base_dir.joinpath("rabbitmq-home").is_dir():
            self._home = self.base_dir / "rabbitmq-home"
        try:
            result = subprocess.run(
                self._cmd("rabbitmqctl", "-n", self.nodename, *args),
                env=self._env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} timed out after {timeout}s") from exc
        if result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()}"
            )
        return result.stdout

    def log_tail(self, n: int = 50) -> str:
        return (
            f"--- {self.log_path}:\n{_tail(self.log_path, n)}\n"
            f"--- {self.stdout_path}:\n{_tail(self.stdout_path, n)}"
        )

    def cleanup(self) -> None:
        """Kill the node and remove a temporary base_dir."""
        try:
            with contextlib.suppress(Exception):
                self.kill()
        finally:
            if self._owns_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)
            self._untrack()

    def _at_exit(self) -> None:
        if self._owns_dir:
            self.cleanup()
            return
        try:
            self.stop(timeout=15)
        finally:
            self.cleanup()

    def __enter__(self) -> RabbitServer:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# --------------------------------------------------------------------------- CLI


def main() -> None:
    """Start both servers, print where they are, wait for Ctrl-C or SIGTERM."""
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    began = time.monotonic()
    with PostgresServer() as pg, RabbitServer() as mq:
        print(
            f"export CDC_RELAY_DSN={pg.dsn}",
        )
        print(
            f"export CDC_RELAY_AMQP_URL={mq.amqp_url}",
        )
        print(
            f"export CDC_RELAY_TEST_DSN={pg.dsn}",
        )
        print(f"export CDC_RELAY_TEST_AMQP_URL={mq.amqp_url}", flush=True)
        print(
            f"# up in {time.monotonic() - began:.1f}s (postgres in {pg.base_dir}, "
            f"rabbitmq node {mq.nodename} in {mq.base_dir}); Ctrl-C stops and removes them",
            file=sys.stderr,
            flush=True,
        )
        while not done.wait(0.5):
            if not pg.is_running() or not mq.is_running():
                print("# a server went away; cleaning up", file=sys.stderr, flush=True)
                break


if __name__ == "__main__":
    main()
