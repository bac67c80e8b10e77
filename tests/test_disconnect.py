"""server.services.generation.until_disconnected: how a whole (non-streamed) answer and a
ticket reply end when their client leaves, or when their work fails meanwhile (unit tests; the
real server's are in test_api_other.py and test_tickets.py)."""

from __future__ import annotations

import asyncio

import pytest

from server.errors import APIError
from server.services.generation import until_disconnected


def test_work_that_ends_is_returned():
    async def work():
        await asyncio.sleep(0.05)
        return 42

    async def never():
        return False

    assert asyncio.run(until_disconnected(never, work())) == 42


def test_a_client_that_left_cancels_the_work_and_is_a_499():
    cancelled = []

    async def work():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def gone():
        return True

    with pytest.raises(APIError) as err:
        asyncio.run(until_disconnected(gone, work()))
    assert err.value.status == 499 and err.value.code == "client_closed"
    assert cancelled == [True]


def test_work_that_failed_while_the_check_ran_keeps_its_error():
    """Found by a review: the work failed while ``disconnected()`` was being awaited; its
    error was dropped (never retrieved) and the request became a 499."""

    async def work():
        await asyncio.sleep(0.3)
        raise ValueError("the engine failed")

    async def slow_gone():
        await asyncio.sleep(0.2)  # the work fails during this check
        return True

    with pytest.raises(ValueError, match="engine failed"):
        asyncio.run(until_disconnected(slow_gone, work()))
