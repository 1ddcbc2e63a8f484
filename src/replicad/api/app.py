"""The management API (aiohttp), served on the local unix socket.

JSON in, JSON out. Every ReplicadError becomes ``{"error": ..., "hint": ...}`` with its
HTTP status; the CLI turns that into ``error: ...`` and exit code 1."""

from __future__ import annotations

from aiohttp import web

from .. import log as logmod
from ..errors import ReplicadError
from . import events, failover, plans, recovery_points, replication, resync_control, server, verify, vms
from .context import HOST_KEY, MAX_BODY, Host

log = logmod.get("replicad.api")


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ReplicadError as e:
        log.info("api.refused", method=request.method, path=request.path, reason=str(e))
        return web.json_response({"error": e.message, "hint": e.hint, "exit_code": e.exit_code},
                                 status=e.http_status)
    except web.HTTPException:
        raise
    except Exception as e:  # noqa: BLE001 — an API bug must not kill the daemon
        log.exception("api.crashed", method=request.method, path=request.path)
        return web.json_response({"error": f"internal error: {type(e).__name__}: {e}"}, status=500)


def create_app(host: Host) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_BODY)
    app[HOST_KEY] = host
    server.routes(app)
    vms.routes(app)
    replication.routes(app)
    resync_control.routes(app)
    verify.routes(app)
    recovery_points.routes(app)
    failover.routes(app)
    events.routes(app)
    plans.routes(app)
    return app
