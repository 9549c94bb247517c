"""The shipped artefacts run with least privilege and hold only the relay (issue 10).

Docker cannot run here, so this checks what can be checked without it: the Dockerfile's
user, health check (run for real against the relay's metrics server) and what it copies;
that the wheel holds ``cdc_relay`` and nothing of the dev tooling; that the constraints
pin exactly the runtime dependency closure the tests ran with; and that every
``CDC_RELAY_*`` variable the deploy files set is one the relay reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from cdc_relay.config import Option, Settings
from cdc_relay.metrics import Metrics, MetricsServer

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
RUNTIME = ("pyproject.toml", "setup.py", "README.md", "deploy/constraints.txt", "cdc_relay")


def instructions(name: str) -> list[str]:
    """The arguments of every ``name`` instruction (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [m[1].strip() for m in re.finditer(rf"^{name}\s+(.*)$", text, re.MULTILINE)]


def test_the_image_runs_as_a_non_root_user() -> None:
    users = instructions("USER")
    assert users, "no USER instruction"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    assert str(user) in DOCKERFILE.split("USER")[0], "the user is created before USER"
    assert instructions("ENTRYPOINT") == ['["cdc-relay"]']


def test_the_image_copies_only_the_package() -> None:
    # COPY --from=<stage> copies from an earlier stage of the build, not from the context.
    copies = [copy for copy in instructions("COPY") if not copy.startswith("--from=")]
    sources = [arg for copy in copies for arg in shlex.split(copy)[:-1]]
    assert sources and all(s.rstrip("/") in RUNTIME for s in sources), sources
    assert "--constraint deploy/constraints.txt" in " ".join(instructions("RUN"))
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1 :] == [
        "!pyproject.toml",
        "!setup.py",
        "!README.md",
        "!cdc_relay/",
        "!deploy/constraints.txt",
        "**/__pycache__",
        "**/*.pyc",
        "cdc_relay/**/*.so",  # a developer's in-place build: the image compiles its own
        "cdc_relay/_accel_manifest.json",
    ]


def healthcheck_command() -> list[str]:
    (check,) = instructions("HEALTHCHECK")
    exec_form = check[check.index("CMD") + 3 :].strip()
    command = [str(part) for part in json.loads(exec_form)]
    assert command[0] == "python" and "curl" not in exec_form
    return [sys.executable, *command[1:]]


@pytest.mark.asyncio
async def test_the_health_check_asks_healthz_and_fails_when_nothing_answers() -> None:
    server = MetricsServer(Metrics(), "127.0.0.1", 0)
    await server.start()
    command = healthcheck_command()

    async def run(port: int) -> int:
        env = {**os.environ, "CDC_RELAY_METRICS_PORT": str(port)}
        proc = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return await asyncio.wait_for(proc.wait(), 30)

    try:
        assert await run(server.port) == 0  # /healthz answers (not ready yet: /readyz 503)
    finally:
        await server.stop()
    assert await run(server.port) != 0


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built as a user's ``pip install .`` builds it (once for this module).

    Without build isolation when this environment has the setuptools that
    ``[build-system]`` requires (offline, fast); otherwise pip fetches it.
    """
    import tomllib

    from packaging.version import Version

    out = tmp_path_factory.mktemp("wheel")
    needed = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    isolate = not all(
        Requirement(req).specifier.contains(Version(metadata.version(Requirement(req).name)))
        for req in needed
    )
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q"]
    pip += [] if isolate else ["--no-build-isolation"]
    subprocess.run(
        [*pip, "-w", str(out), str(ROOT)], check=True, capture_output=True, timeout=300, cwd=out
    )
    (built,) = out.glob("cdc_relay-*.whl")
    return built


def test_the_wheel_holds_the_package_and_no_dev_tooling(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"cdc_relay"}, tops
    assert "cdc_relay/sql/outbox.sql" in names
    assert not [n for n in names if re.search(r"devtools|tests/|bench/|scripts/", n)]


def test_the_wheel_requires_what_the_package_imports(wheel: Path) -> None:
    """pamqp (cdc_relay/amqp/) is required; aio-pika only by the extra that uses it."""
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        meta = zf.read(name).decode()
    requires = [
        line.split(":", 1)[1].strip() for line in meta.splitlines() if "Requires-Dist:" in line
    ]
    unconditional = {Requirement(r).name for r in requires if Requirement(r).marker is None}
    assert "pamqp" in unconditional, requires
    assert "aio-pika" not in unconditional, requires
    assert any(
        Requirement(r).name == "aio-pika" and 'extra == "aio-pika"' in str(Requirement(r).marker)
        for r in requires
    ), requires
    assert "License-Expression: MIT" in meta.splitlines(), meta[:800]


def closure(requirements: list[str]) -> dict[str, str]:
    """Installed name -> version for these requirements and everything they need."""
    found: dict[str, str] = {}
    todo = [(Requirement(r), ()) for r in requirements]
    while todo:
        req, extras = todo.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (*extras, "")):
            continue
        dist = metadata.distribution(req.name)
        name = dist.metadata["Name"].lower().replace("_", "-")
        if name in found and not req.extras:
            continue
        found[name] = dist.version
        todo += [(Requirement(r), tuple(req.extras)) for r in dist.requires or []]
    return found


def test_constraints_pin_the_runtime_closure_the_tests_use() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = (ROOT / "deploy" / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    assert pins == closure(project["dependencies"]), "regenerate deploy/constraints.txt"


def test_deploy_files_set_only_variables_the_relay_reads() -> None:
    known = {"CDC_RELAY_DSN_FILE", "CDC_RELAY_AMQP_URL_FILE"}
    for field in dataclasses.fields(Settings):
        option: Option = field.metadata["cli"]
        known.add(option.env_for(field.name))
    for path in ("Dockerfile", "deploy/cdc-relay.service", "deploy/kubernetes.yaml"):
        used = set(re.findall(r"\bCDC_RELAY_[A-Z_]+", (ROOT / path).read_text()))
        assert used, path
        assert used <= known, (path, used - known)
