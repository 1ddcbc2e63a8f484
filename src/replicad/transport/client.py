"""The primary's side of the peer protocol (docs/protocol.md), over the token listener.

Every request carries a fresh ticket for the replica's name. Errors are sorted into
transient (unreachable, 5xx: retry) and permanent (401/403/409: an operator must act)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp

from .. import PROTOCOL_VERSION, __version__
from ..auth.token import SCHEME, Credential
from ..errors import PeerError, PeerUnreachable

CONNECT_TIMEOUT = 10
READ_TIMEOUT = 300


class _Resolver(aiohttp.abc.AbstractResolver):
    """Names in the config's ``resolve`` map first, then the system resolver."""

    def __init__(self, static: dict[str, str]):
        self._static = static
        self._default = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
        addr = self._static.get(host.lower())
        if addr is None:
            return await self._default.resolve(host, port, family)
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        return [{"hostname": host, "host": addr, "port": port, "family": fam, "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        await self._default.close()


class PeerClient:
    def __init__(self, credential: Credential | None, resolve: dict[str, str]):
        self.credential = credential
        self._resolve = resolve
        self._session: aiohttp.ClientSession | None = None

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            conn = aiohttp.TCPConnector(resolver=_Resolver(self._resolve), limit=64, force_close=False)
            self._session = aiohttp.ClientSession(
                connector=conn, timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT,
                                                              sock_read=READ_TIMEOUT),
                headers={"User-Agent": f"replicad/{__version__}"})
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _headers(self, server: str) -> dict[str, str]:
        if self.credential is None:
            raise PeerError("this host has no realm credential (config `realm.credential`)", status=0,
                            transient=False)
        return {"Authorization": f"{SCHEME} {self.credential.ticket(server)}",
                "X-Replicad-Protocol": str(PROTOCOL_VERSION)}

    async def _request(self, method: str, server: str, port: int, path: str, *, data=None) -> dict:
        url = f"http://{server}:{port}{path}"
        try:
            async with self._sess().request(method, url, data=data, headers=self._headers(server)) as resp:
                try:
                    body = await resp.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError):
                    body = {}
                if not isinstance(body, dict):
                    body = {}
                if resp.status >= 400:
                    msg = str(body.get("error") or resp.reason)[:500]
                    raise PeerError(f"{server} answered {resp.status}: {msg}", status=resp.status,
                                    transient=resp.status >= 500 or resp.status == 429,
                                    code=str(body.get("code", ""))[:32])
                return body
        except aiohttp.ClientConnectorError as e:
            raise PeerUnreachable(f"cannot reach {server}:{port}: {e.os_error.strerror or e}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
            raise PeerUnreachable(f"connection to {server}:{port} failed: {type(e).__name__} {e}".strip()) from None

    async def hello(self, server: str, port: int) -> dict:
        return await self._request("GET", server, port, "/v1/hello")

    async def replica_status(self, server: str, port: int, vm_id: str) -> dict:
        return await self._request("GET", server, port, f"/v1/replicas/{vm_id}")

    async def push_log(self, server: str, port: int, vm_id: str, seq: int, body: AsyncIterator[bytes]) -> dict:
        return await self._request("PUT", server, port, f"/v1/replicas/{vm_id}/logs/{seq}", data=body)
