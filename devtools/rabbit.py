"""A private RabbitMQ node: own node name, ports, data, logs and cookie.

Debian's ``rabbitmq-server`` script drops to the ``rabbitmq`` user when run as
root, so the node's directories are owned by it. pytest-rabbitmq's executor
was considered: it cannot restart a node on the same data after a kill -9 the
way the fault tests need.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode

from devtools.procs import (
    LOOPBACK,
    Server,
    as_user,
    check_servers_allowed,
    chown_tree,
    cmdline,
    free_ports,
    kill_tree,
    pid_alive,
    port_open,
    remaining,
    service_user,
    tail,
    wait_until,
)

if TYPE_CHECKING:
    from devtools.tls import TlsFiles

__all__ = ["RabbitServer", "kill_rabbit"]

# RabbitMQ's Debian scripts (not the /usr/sbin wrapper, which `su`s by itself).
RABBITMQ_SCRIPTS = Path(os.environ.get("CDC_RELAY_RABBITMQ_SCRIPTS", "/usr/lib/rabbitmq/bin"))


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
        args = cmdline(pid)
        if args and b"beam" in args.split(b"\0", 1)[0] and marker in args:
            pids.append(pid)
    return [pid for pid in pids if pid_alive(pid)]


def kill_rabbit(base_dir: Path) -> list[int]:
    """SIGKILL the node in ``base_dir`` and its port programs; return survivors."""
    pids = _rabbit_pids(base_dir)
    return kill_tree(pids) if pids else []


# The listeners, the distribution port and the CLI's own node all bind to all
# interfaces unless told otherwise.
_ERL_LOOPBACK_ARGS = "-kernel inet_dist_use_interface {127,0,0,1}"
_STARTED_MARKER = b"Server startup complete"


def _rabbit_app_closure(plugins: Path, enabled: tuple[str, ...] = ()) -> dict[str, Path] | None:
    """Application dirs the broker needs (rabbit, the ``enabled`` plugins and their
    dependencies) from the plugins dir, or None when the layout is not the one we know."""
    apps: dict[str, Path] = {}
    for entry in plugins.iterdir():
        if entry.is_dir() and (entry / "ebin").is_dir():
            apps[entry.name.rsplit("-", 1)[0]] = entry
    if "rabbit" not in apps or "rabbitmq_prelaunch" not in apps:
        return None
    needed: dict[str, Path] = {}
    todo = ["rabbit", "rabbitmq_prelaunch", *enabled]
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


class RabbitServer(Server):
    """A private RabbitMQ node: own node name, ports, data, logs and cookie.

    With ``tls`` the node has only a TLS listener on ``port`` (``listeners.tcp =
    none``); with ``external`` as well, it requires a client certificate and
    offers the EXTERNAL mechanism (``rabbitmq_auth_mechanism_ssl``), logging in
    the user named by the certificate's common name, which start() creates.
    ``cookie`` shares an Erlang cookie between the nodes of a cluster.
    """

    KIND = "mq"
    PREFIX = "cdc-relay-mq-"

    def __init__(
        self,
        base_dir: Path | None = None,
        port: int | None = None,
        dist_port: int | None = None,
        nodename: str | None = None,
        *,
        tls: TlsFiles | None = None,
        external: bool = False,
        cookie: str | None = None,
    ) -> None:
        if external and tls is None:
            raise ValueError("external (certificate) logins need tls")
        self.tls = tls
        self.external = external
        self._cookie = cookie
        self.plugins: tuple[str, ...] = ("rabbitmq_auth_mechanism_ssl",) if external else ()
        self._init_dir(base_dir)
        ports = free_ports(2)
        self.port: int = port or ports[0]
        self.dist_port: int = dist_port or next(p for p in ports if p != self.port)
        # Mnesia data is per node name: reuse the one this base_dir was made with.
        saved = self.base_dir / "nodename"
        if nodename is None and saved.exists():
            nodename = saved.read_text().strip() or None
        self.nodename: str = nodename or f"cdcrelay-{uuid.uuid4().hex[:10]}@localhost"
        self.user = service_user("CDC_RELAY_RABBITMQ_USER", "rabbitmq", required=False)
        self.log_path: Path = self.base_dir / "log" / "rabbit.log"
        self.stdout_path: Path = self.base_dir / "stdout.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._home: Path | None = None

    @property
    def amqp_url(self) -> str:
        """guest's URL; with TLS an ``amqps://`` URL for ``localhost`` (the certificate's
        name) carrying the CA as RabbitMQ's URI spec names it (``cacertfile``)."""
        if self.tls is None:
            return f"amqp://guest:guest@{LOOPBACK}:{self.port}/"
        return f"amqps://guest:guest@localhost:{self.port}/?cacertfile={quote(str(self.tls.ca))}"

    @property
    def external_url(self) -> str:
        """The certificate login: EXTERNAL mechanism, client certificate and key, no password."""
        assert self.tls is not None and self.external, "external_url needs tls and external"
        query = urlencode(
            {
                "auth_mechanism": "external",
                "cacertfile": str(self.tls.ca),
                "certfile": str(self.tls.client_cert),
                "keyfile": str(self.tls.client_key),
            }
        )
        return f"amqps://localhost:{self.port}/?{query}"

    def __repr__(self) -> str:
        return f"RabbitServer(port={self.port}, nodename={self.nodename!r})"

    def _prepare(self) -> None:
        base = self.base_dir
        for sub in ("mnesia", "log"):
            (base / sub).mkdir(exist_ok=True)
        (base / "nodename").write_text(self.nodename + "\n")
        # No plugins unless asked for (management would double the boot time).
        (base / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")
        cookie = base / ".erlang.cookie"
        if self._cookie is not None:
            cookie.unlink(missing_ok=True)
            cookie.write_text(self._cookie)
        elif not cookie.exists():
            cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o600)
        if self.tls is not None:
            self._write_tls_config()
        self._home = self._trimmed_home()
        chown_tree(base, self.user)

    def _write_tls_config(self) -> None:
        """rabbitmq.conf for a TLS-only listener (and EXTERNAL logins when asked)."""
        assert self.tls is not None
        base = self.base_dir
        for name, source in (
            ("ca.pem", self.tls.ca),
            ("server.pem", self.tls.server_cert),
            ("server.key", self.tls.server_key),
        ):
            (base / name).write_bytes(source.read_bytes())
            (base / name).chmod(0o600)
        lines = [
            "listeners.tcp = none",
            f"listeners.ssl.default = {LOOPBACK}:{self.port}",
            f"ssl_options.cacertfile = {base / 'ca.pem'}",
            f"ssl_options.certfile = {base / 'server.pem'}",
            f"ssl_options.keyfile = {base / 'server.key'}",
            "ssl_options.verify = verify_peer",
            f"ssl_options.fail_if_no_peer_cert = {str(self.external).lower()}",
        ]
        if self.external:
            lines += [
                "auth_mechanisms.1 = PLAIN",
                "auth_mechanisms.2 = AMQPLAIN",
                "auth_mechanisms.3 = EXTERNAL",
                "ssl_cert_login_from = common_name",
            ]
        (base / "rabbitmq.conf").write_text("\n".join(lines) + "\n")

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
        apps = _rabbit_app_closure(real / "plugins", self.plugins)
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
        if self.tls is None:
            # These override rabbitmq.conf's listeners: a TLS node must not have them.
            env["RABBITMQ_NODE_IP_ADDRESS"] = LOOPBACK
            env["RABBITMQ_NODE_PORT"] = str(self.port)
        if self._home is not None:
            env["RABBITMQ_SCRIPTS_DIR"] = str(self._home / "sbin")
        return env

    def _cmd(self, script: str, *args: str) -> list[str]:
        return [*as_user(self.user), str(RABBITMQ_SCRIPTS / script), *args]

    def start(self, timeout: float = 60) -> None:
        """Boot the node in the background and wait until the broker app runs."""
        check_servers_allowed("RabbitMQ")
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
            if self.external:
                self._add_certificate_user(remaining(deadline))
        except BaseException:
            with contextlib.suppress(Exception):
                self.kill()
            raise

    def _add_certificate_user(self, timeout: float) -> None:
        """The user EXTERNAL logs in (the client certificate's CN), with all permissions."""
        assert self.tls is not None
        name = self.tls.client_name
        if name not in self.ctl("list_users", "--quiet", timeout=max(timeout, 5)).split():
            self.ctl("add_user", name, uuid.uuid4().hex, timeout=max(timeout, 5))
        self.ctl("set_permissions", "-p", "/", name, ".*", ".*", ".*", timeout=max(timeout, 5))

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
            if port_since is None and port_open(self.port):
                port_since = time.monotonic()
            if port_since is not None:
                if self._log_since(log_offset).find(_STARTED_MARKER) >= 0:
                    return
                if time.monotonic() - port_since > 3:
                    self.ctl("await_startup", timeout=max(1.0, remaining(deadline)))
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
        if not wait_until(lambda: not self.is_running(), deadline):
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
        survivors = kill_rabbit(self.base_dir)
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

    @property
    def beam_pid(self) -> int | None:
        """The node's Erlang VM (for CPU accounting and crash tests), or None."""
        pids = _rabbit_pids(self.base_dir)
        return pids[0] if pids else None

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
            f"--- {self.log_path}:\n{tail(self.log_path, n)}\n"
            f"--- {self.stdout_path}:\n{tail(self.stdout_path, n)}"
        )

    def _stop_cleanly(self) -> None:
        self.stop(timeout=15)
