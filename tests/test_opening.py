"""Opening a session: each step is bounded, so a silent server ends the session."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from cdc_relay.config import Settings
from cdc_relay.core import SessionFailed
from cdc_relay.opening import identify, take_slot


class SilentStream:
    """A replication connection whose server took START_REPLICATION and never answered."""

    def __init__(self) -> None:
        self.starts = 0

    async def start(self, *args: Any, **kwargs: Any) -> None:
        self.starts += 1
        await asyncio.Event().wait()


@pytest.mark.asyncio
async def test_a_start_replication_without_answer_ends_the_session() -> None:
    """Before: take_slot waited for ever (a fault test's relay hung after a Postgres restart)."""
    settings = Settings(pg_timeout=1.0)
    stream = SilentStream()
    began = time.monotonic()
    with pytest.raises(SessionFailed, match="START_REPLICATION got no answer in 1s"):
        await asyncio.wait_for(
            take_slot(stream, settings, asyncio.Event(), messages=False),  # type: ignore[arg-type]
            10,
        )
    assert time.monotonic() - began < 5
    assert stream.starts == 1


class SilentIdentify:
    async def identify_system(self) -> tuple[str, int, int]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


@pytest.mark.asyncio
async def test_an_identify_system_without_answer_ends_the_session() -> None:
    with pytest.raises(SessionFailed, match="IDENTIFY_SYSTEM got no answer in 1s"):
        await asyncio.wait_for(
            identify(SilentIdentify(), Settings(pg_timeout=1.0)),  # type: ignore[arg-type]
            10,
        )
