"""The process assembled: the proxy (``app.Proxy``, every service) and, in front of it, the
admin API. Built here, in the control layer, so the proxy knows nothing of its operators'
server: ``run`` starts one of these, and so do the tests that talk to the API."""

from __future__ import annotations

import asyncio

from ..app import Proxy, listening
from ..config import Config
from .admin import AdminServer


class ProxyProcess:
    """The proxy and its admin API, started and ended together."""

    def __init__(self, config: Config) -> None:
        self.proxy = Proxy(config)
        # Made (and its token checked) before anything listens: a public admin address
        # without a token refuses the start before a service opens a port.
        self.admin = AdminServer(self.proxy, config.admin)

    async def start(self) -> None:
        """Every service, then the API (ListenError if its address is taken)."""
        await self.proxy.start()
        try:
            with listening("admin API", self.proxy.config.admin.listen):
                await self.admin.start()
        except BaseException:
            await self.proxy.close()
            raise

    async def drain(self, grace: float, hurry: asyncio.Event | None = None) -> None:
        """The API goes first (nothing is changed while the services drain), then the
        services stop accepting and their connections get ``grace`` seconds."""
        await self.admin.close()
        await self.proxy.drain(grace, hurry)

    async def close(self) -> None:
        await self.admin.close()
        await self.proxy.close()
