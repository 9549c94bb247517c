"""Imports run one way: the app-side helpers never load the CLI's settings or the admin code.

An application that enqueues rows or dedupes messages imports ``cdc_relay.outbox``
or ``cdc_relay.inbox`` in every worker; pulling in ``config`` (the relay's
options) or ``pg.*`` (the operator's commands) with them once made an import
circle (``inbox -> outbox -> pg.admin -> inbox``). Each check runs in a fresh
interpreter, because this process has long since imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FORBIDDEN = ("cdc_relay.config", "cdc_relay.pg")


def loaded_by(module: str) -> list[str]:
    """The cdc_relay modules a fresh interpreter holds after importing ``module``."""
    code = (
        f"import json, sys, {module}; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('cdc_relay'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return list(json.loads(done.stdout))


@pytest.mark.parametrize(
    "module", ["cdc_relay.outbox", "cdc_relay.inbox", "cdc_relay.contrib.django"]
)
def test_app_side_helpers_load_neither_config_nor_admin_code(module: str) -> None:
    loaded = loaded_by(module)
    assert module in loaded
    wrong = [m for m in loaded if m in FORBIDDEN or m.startswith("cdc_relay.pg.")]
    assert wrong == [], f"import {module} loads {wrong}"


def test_schema_module_depends_on_errors_and_the_column_list_only() -> None:
    assert loaded_by("cdc_relay.schema") == [
        "cdc_relay",
        "cdc_relay.accel",  # the package's import hook (standard library only)
        "cdc_relay.errors",
        "cdc_relay.rows",
        "cdc_relay.schema",
    ]
