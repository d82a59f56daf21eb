"""A small asyncpg pool that prepares its database once, for the helpers beside the PostgreSQL sink."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg

from core.settings import Secret, mask_dsn

__all__ = ["LazyPool"]


class LazyPool:
    """Created on the first :meth:`get` (or :meth:`start`), with ``setup`` run on it once."""

    def __init__(self, dsn: str | Secret, setup: Callable[[asyncpg.Connection], Awaitable[None]], *,
                 max_size: int = 2, connect_timeout: float = 10.0) -> None:
        self._dsn = dsn if isinstance(dsn, Secret) else Secret(dsn)
        self._setup = setup
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"LazyPool(dsn={mask_dsn(self._dsn.get())!r})"

    async def get(self) -> asyncpg.Pool:
        async with self._lock:
            if self._pool is None:
                pool = await asyncpg.create_pool(self._dsn.get(), min_size=1, max_size=self.max_size,
                                                 timeout=self.connect_timeout)
                try:
                    async with pool.acquire(timeout=self.connect_timeout) as conn:
                        await self._setup(conn)
                except BaseException:
                    pool.terminate()
                    raise
                self._pool = pool
            return self._pool

    async def start(self) -> None:
        await self.get()

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10.0)
            except Exception:  # a dead server must not block shutdown
                pool.terminate()
