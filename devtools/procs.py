"""Processes, ports and users for the throwaway servers, and their one lifecycle.

``Server`` is the lifecycle every launcher shares (Postgres, a RabbitMQ node,
Prometheus):
its own directory, start with a deadline, a clean stop, a hard kill, cleanup.
``ServerGroup`` is the same for servers started together (a RabbitMQ cluster,
a Postgres primary and standby). Servers must not outlive the Python process
that started them: an ``atexit`` hook cleans them up on a normal exit, and a
tiny watchdog child process (the guardian) kills them, and removes their
temporary directories, when this process dies without running ``atexit``
(SIGTERM, SIGKILL, OOM).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Self

LOOPBACK = "127.0.0.1"
# Unix socket paths are limited to 107 bytes (sun_path).
MAX_SOCKET_PATH = 100
REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- ports


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """Distinct free ports: successive free_port() calls may return the same one."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOOPBACK, port)) == 0


def listen_addresses(port: int) -> set[str]:
    """Local addresses of listening TCP sockets on ``port`` (from /proc/net)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A = LISTEN
                continue
            if len(address) == 8:
                found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
            else:
                found.add(f"ipv6:{address}")
    return found


# --------------------------------------------------------------------------- users and files


def service_user(env_var: str, default: str, required: bool) -> str | None:
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


def as_user(user: str | None) -> list[str]:
    """Command prefix that drops root to ``user``, keeping our environment."""
    if user is None:
        return []
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]
    return ["runuser", "-p", "-u", user, "--"]


def chown_tree(path: Path, user: str | None) -> None:
    """Give ``path`` (recursively, never following symlinks) to ``user``."""
    if user is None:
        return
    entry = pwd.getpwnam(user)
    os.lchown(path, entry.pw_uid, entry.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


def write_owned(path: Path, text: str | bytes, user: str | None, mode: int | None = None) -> None:
    """Write a file the server user owns (and may read when mode is 0600)."""
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    if mode is not None:
        path.chmod(mode)
    chown_tree(path, user)


def tail(path: Path, n: int) -> str:
    """The last ``n`` lines of a log, for error messages."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(lines[-n:])


def remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def wait_until(ready: Callable[[], bool], deadline: float, interval: float = 0.05) -> bool:
    """Poll ``ready`` until it holds or ``deadline`` (monotonic) passes; whether it held.

    The one wait loop of the launchers: readiness, a stop, a kill all end here.
    """
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


# --------------------------------------------------------------------------- processes


def pid_alive(pid: int) -> bool:
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


def cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def descendants(pid: int) -> list[int]:
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


def kill_tree(pids: list[int], timeout: float = 10) -> list[int]:
    """SIGKILL each process and its descendants; return the ones still alive.

    Each root is stopped first so it cannot fork a child we would miss.
    """
    victims: list[int] = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        victims += [pid, *descendants(pid)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(pid_alive(p) for p in victims), time.monotonic() + timeout, 0.02)
    return [p for p in victims if pid_alive(p)]


# --------------------------------------------------------------------------- lifetime


def check_servers_allowed(what: str) -> None:
    """Refuse to boot a server where none may run (``make test-unit`` sets the variable):
    a test that needs a server but is not marked ``integration`` fails there, loudly."""
    if os.environ.get("DEVTOOLS_FORBID_SERVERS"):
        raise RuntimeError(
            f"{what} not started: DEVTOOLS_FORBID_SERVERS is set (a unit-test run); "
            "mark the test `integration` (tests/conftest.py)"
        )


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
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        cls._proc = subprocess.Popen(
            [sys.executable, "-c", "from devtools.procs import guardian_main; guardian_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            env=env,
            start_new_session=True,
        )
        cls._owner = os.getpid()
        return cls._proc


def guardian_main() -> None:
    """Body of the watchdog process (see _Guardian)."""
    from devtools.postgres import kill_postgres
    from devtools.prometheus import kill_prometheus
    from devtools.rabbit import kill_rabbit

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
                kill_postgres(Path(path) / "data")
            elif kind == "prom":
                kill_prometheus(Path(path))
            else:
                kill_rabbit(Path(path))
        if owned:
            shutil.rmtree(path, ignore_errors=True)


class Tracked:
    """Registration of started servers with atexit and the guardian."""

    KIND = ""
    base_dir: Path
    _owns_dir: bool
    _tracked_by = 0

    def _track(self) -> None:
        if self._tracked_by == os.getpid():
            return
        self._tracked_by = os.getpid()
        _LIVE.add(self)
        _Guardian.send("+", self.KIND, self.base_dir, self._owns_dir)

    def _untrack(self) -> None:
        if self._tracked_by == os.getpid():
            _Guardian.send("-", self.KIND, self.base_dir, self._owns_dir)
        self._tracked_by = 0
        _LIVE.discard(self)

    def _at_exit(self) -> None:
        raise NotImplementedError


_LIVE: set[Tracked] = set()


@atexit.register
def _cleanup_all() -> None:
    """Stop every server this process started (not a forked child's copies)."""
    for server in list(_LIVE):
        if server._tracked_by == os.getpid():
            with contextlib.suppress(Exception):
                server._at_exit()


class Server(Tracked):
    """The lifecycle of one throwaway server process, written once.

    A subclass says how to ``start`` (``check_servers_allowed``, then
    ``_track`` once it launches), stop cleanly, ``kill`` and tell
    ``is_running``; this class owns the directory, ``cleanup``, the exit hook
    and the context manager.
    """

    PREFIX = "cdc-relay-"

    def _init_dir(self, base_dir: Path | None) -> None:
        """A fresh temp dir (removed by cleanup) or the caller's (kept)."""
        self._owns_dir = base_dir is None
        if base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix=self.PREFIX))
        else:
            self.base_dir = Path(base_dir).absolute()
            self.base_dir.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 60) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def is_running(self) -> bool:
        raise NotImplementedError

    def _stop_cleanly(self) -> None:
        """Shut down so the kept data directory is consistent (at exit)."""
        raise NotImplementedError

    def _stop_hard(self) -> None:
        """Take the processes down however possible (cleanup): kill by default."""
        self.kill()

    def cleanup(self) -> None:
        """Take the server down and remove a temporary base_dir."""
        try:
            with contextlib.suppress(Exception):
                self._stop_hard()
        finally:
            if self._owns_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)
            self._untrack()

    def _at_exit(self) -> None:
        if self._owns_dir:
            self.cleanup()
            return
        # A caller-provided directory is kept: shut the server down cleanly.
        try:
            self._stop_cleanly()
        finally:
            self.cleanup()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class ServerGroup:
    """Servers started together in one directory (a cluster, a primary and standby)."""

    PREFIX = "cdc-relay-"

    def _init_dir(self, base_dir: Path | None) -> None:
        self._owns_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix=self.PREFIX))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.base_dir.chmod(0o711)  # the server user (root runs) must reach the member dirs

    def members(self) -> Iterable[Server]:
        """The servers, in the order cleanup takes them down."""
        raise NotImplementedError

    def start(self, timeout: float = 60) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        """Take every member down and remove the directory this group made."""
        for server in self.members():
            with contextlib.suppress(Exception):
                server.cleanup()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
