"""Several Docker engines in one proxy: the machine's and a second dockerd this test
starts (its own data root and socket; the machine's engine is never touched)."""

from __future__ import annotations

import pytest

from tests.helpers import (
    config_from,
    config_text,
    free_port,
    http_get,
    running,
    service,
    wait_until,
)
from wakeproxy.control import metrics
from wakeproxy.core.states import State
from wakeproxy.runtimes.engine import _clock_offset

pytestmark = [pytest.mark.asyncio, pytest.mark.docker]
BODY = b"hello from busybox\n"


async def test_a_service_on_each_of_two_engines_and_a_stopped_engine_fails_only_its_own(
    make_container, own_engine
):
    near_port, near_backend = free_port(), free_port()
    far_port, far_backend = free_port(), free_port()
    near_name = make_container(near_backend, paused=True)
    far_name = own_engine.httpd(far_backend, paused=True)
    policy = {"idle_timeout": 1}
    config = config_from(
        config_text(
            service("near", near_port, near_backend, container=near_name, sleep_policy=policy),
            service(
                "far", far_port, far_backend, container=far_name, engine="second",
                sleep_policy=policy, wake_timeout=10,
            ),
            engines={"second": {"host": own_engine.host}},
        )
    )  # fmt: skip
    async with running(config) as proxy:
        near, far = proxy.services["near"], proxy.services["far"]
        assert sorted(proxy.engines) == ["local", "second"]
        # Each state came from its own engine's listing: the names exist on one each.
        assert (near.state, far.state) == (State.PAUSED, State.PAUSED)
        assert (await http_get(near_port)).endswith(BODY)
        assert (await http_get(far_port)).endswith(BODY)
        await wait_until(lambda: near.stats.wakes["ok"] == far.stats.wakes["ok"] == 1, within=30)
        await wait_until(lambda: near.state is far.state is State.PAUSED, within=20)

        # The second engine goes away: its service fails when it needs the engine; the
        # first engine's service goes on being woken and served.
        own_engine.stop()
        assert await http_get(far_port, within=20) == b""
        await wait_until(lambda: far.state is State.FAILED, within=20)
        assert (await http_get(near_port)).endswith(BODY)
        # (the container can answer before the engine's reply to the unpause arrives)
        await wait_until(lambda: near.stats.wakes["ok"] == 2, within=30)
        text = metrics.render(proxy).decode()
        assert 'wakeproxy_engine_up{engine="second"} 0.0' in text
        assert 'wakeproxy_engine_up{engine="local"} 1.0' in text

        # Back (live-restore kept its container paused): it recovers by itself.
        own_engine.start()
        await wait_until(lambda: far.state is State.PAUSED, within=60)
        assert (await http_get(far_port, within=30)).endswith(BODY)
        assert 'wakeproxy_engine_up{engine="second"} 1.0' in metrics.render(proxy).decode()


async def test_a_remote_engines_clock_offset_is_read_from_its_system_time():
    # 2026-12-02T03:00:00Z; the engine reports nanoseconds.
    at = 1_796_180_400.0
    assert _clock_offset("2026-12-02T03:00:02.500000000Z", at) == pytest.approx(2.5)
    assert _clock_offset("2026-12-02T04:00:00+01:00", at + 10) == pytest.approx(-10)
    assert _clock_offset("", at) == 0.0 and _clock_offset("yesterday", at) == 0.0
