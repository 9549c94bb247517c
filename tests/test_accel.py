"""Which hot path runs (issue 20): the rule in ``cdc_relay.accel`` and where it is reported.

The rule is tested on a throwaway package directory (fake extension files, a
manifest written here); the import hook, the ``run`` log line, the
``cdc_relay_build_info`` label and ``status`` in fresh interpreters, one per
implementation. The differential tests (test_accel_differential.py) prove the
two implementations behave the same.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cdc_relay.accel import (
    COMPILED,
    COMPILED_NAME,
    MANIFEST,
    PURE_ENV,
    PURE_NAME,
    HotPathFinder,
    choice,
    decide,
    implementation,
    source_digest,
    source_path,
)
from cdc_relay.metrics import Metrics
from cdc_relay.pg.report import SlotStatus
from cdc_relay.status_view import render_text
from devtools.procs import free_port

ROOT = Path(__file__).resolve().parent.parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
NO_PURE_ENV = {k: v for k, v in os.environ.items() if k != PURE_ENV}


def fake_build(package: Path, *, skip: str | None = None) -> None:
    """A package directory as a successful build leaves it: sources, extensions, manifest."""
    digests = {}
    for module in COMPILED:
        source = source_path(module, package)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f"# {module}\n")
        digests[module] = source_digest(source)
        if module != skip:
            source.with_name(source.stem + SUFFIX).write_bytes(b"\x7fELF")
    (package / MANIFEST).write_text(json.dumps(digests))


def test_a_complete_fresh_build_runs_compiled(tmp_path: Path) -> None:
    fake_build(tmp_path)
    choice = decide({}, tmp_path)
    assert choice.implementation == COMPILED_NAME
    assert set(choice.extensions) == set(COMPILED)
    assert all(path.name.endswith(SUFFIX) for path in choice.extensions.values())


@pytest.mark.parametrize("value", ["1", "yes"])
def test_the_environment_forces_pure_python(tmp_path: Path, value: str) -> None:
    fake_build(tmp_path)
    choice = decide({PURE_ENV: value}, tmp_path)
    assert (choice.implementation, choice.extensions) == (PURE_NAME, {})
    assert PURE_ENV in choice.reason
    assert decide({PURE_ENV: "0"}, tmp_path).implementation == COMPILED_NAME


def test_no_build_runs_pure_python(tmp_path: Path) -> None:
    choice = decide({}, tmp_path)
    assert choice.implementation == PURE_NAME
    assert "not compiled" in choice.reason


def test_a_partial_build_runs_pure_python_not_a_mix(tmp_path: Path) -> None:
    fake_build(tmp_path, skip=COMPILED[-1])
    choice = decide({}, tmp_path)
    assert (choice.implementation, choice.extensions) == (PURE_NAME, {})
    assert COMPILED[-1] in choice.reason


def test_a_source_edited_since_the_build_runs_pure_python(tmp_path: Path) -> None:
    """Never stale compiled code: an edited hot module is run from its source."""
    fake_build(tmp_path)
    edited = source_path(COMPILED[0], tmp_path)
    edited.write_text(edited.read_text() + "x = 1\n")
    choice = decide({}, tmp_path)
    assert choice.implementation == PURE_NAME
    assert f"{edited.name} changed since it was compiled" in choice.reason


def loaded_files(env: dict[str, str]) -> dict[str, str]:
    code = (
        "import json, importlib; from cdc_relay import accel; "
        "print(json.dumps({m: importlib.import_module(m).__file__ for m in accel.COMPILED} "
        "| {'implementation': accel.implementation()}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
        env=env,
    )
    return dict(json.loads(done.stdout))


def test_pure_python_is_imported_from_the_sources_even_beside_extensions() -> None:
    files = loaded_files({**NO_PURE_ENV, PURE_ENV: "1"})
    assert files.pop("implementation") == PURE_NAME
    assert files == {m: str(source_path(m)) for m in COMPILED}


def test_compiled_modules_are_imported_when_built() -> None:
    """Every module of the list is the extension (make test builds them in place)."""
    choice = decide(NO_PURE_ENV)
    assert choice.implementation == COMPILED_NAME, choice.reason
    files = loaded_files(NO_PURE_ENV)
    assert files.pop("implementation") == COMPILED_NAME
    assert files == {m: str(choice.extensions[m]) for m in COMPILED}


def test_modules_left_pure_load_from_source_even_beside_an_old_extension() -> None:
    """The finder places every module of the package: an extension file left by an older
    build (of a module since dropped from COMPILED) is never what Python picks."""
    finder = HotPathFinder()
    for module in ("cdc_relay.core", "cdc_relay.router", "cdc_relay.amqp_wire"):
        assert module not in COMPILED
        spec = finder.find_spec(module, None)
        assert spec is not None and spec.origin == str(source_path(module)), spec
    extensions = choice().extensions
    for module in COMPILED:
        spec = finder.find_spec(module, None)
        expected = extensions.get(module, source_path(module))
        assert spec is not None and spec.origin == str(expected), spec
    assert finder.find_spec("cdc_relay.pg", None) is None  # a package: the usual finders
    assert finder.find_spec("json", None) is None


def test_status_and_the_metric_say_which_implementation_runs() -> None:
    fields = SlotStatus(role="primary", slot="s", slot_exists=False).as_dict()
    assert fields["implementation"] == implementation()
    assert f"hot path:             {implementation()}" in render_text(fields)
    text = Metrics("s").render().decode()
    assert f'implementation="{implementation()}"' in text


@pytest.mark.parametrize("pure", [False, True])
def test_run_logs_and_exports_its_implementation(tmp_path: Path, pure: bool) -> None:
    """Server-less: nothing listens at the DSN, so the relay retries while we look."""
    port = free_port()
    env = {**NO_PURE_ENV, **({PURE_ENV: "1"} if pure else {}), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "relay.log"
    args = ["--dsn", "postgresql://u@127.0.0.1:1/x", "--amqp-url", "amqp://u:p@127.0.0.1:1/"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cdc_relay.cli", "run", *args, "--metrics-port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    expected = PURE_NAME if pure else COMPILED_NAME
    try:
        deadline = time.monotonic() + 30
        metrics = ""
        while time.monotonic() < deadline and "cdc_relay_build_info{" not in metrics:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    metrics = r.read().decode()
            except OSError:
                continue
        assert f'implementation="{expected}"' in metrics, metrics
        # Nothing is logged before the startup checks answer (a refusal is one line); the
        # streaming line names the hot path (tests/test_relay_e2e.py, with real servers).
        assert "hot path" not in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_a_build_without_a_c_compiler_installs_pure_python_with_one_line(tmp_path: Path) -> None:
    """What ``pip install`` runs (setup.py's build_ext), on a copy of the package."""
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, tmp_path / name)
    shutil.copytree(
        ROOT / "cdc_relay",
        tmp_path / "cdc_relay",
        ignore=shutil.ignore_patterns("*.so", MANIFEST, "__pycache__"),
    )
    if (ROOT / "build" / "cython").is_dir():  # Cython's C output, to skip regenerating it
        shutil.copytree(ROOT / "build" / "cython", tmp_path / "build" / "cython")
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc")}
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("cdc-relay:")]
    assert len(said) == 1 and "installing pure Python only" in said[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "cdc_relay" / MANIFEST).exists()
    assert decide({}, tmp_path / "cdc_relay").implementation == PURE_NAME
