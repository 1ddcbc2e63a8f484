"""The daemon's shutdown order, seen from outside, with the daemons in the test's process."""

import asyncio
from pathlib import Path

from ..integration.images import make_sparse_image
from .daemons import InProcessHost
from .test_pair import enable

MiB = 1 << 20


async def _answer(connect) -> str:
    try:
        _, writer = await connect()
    except ConnectionRefusedError:
        return "refused"
    writer.close()
    await writer.wait_closed()
    return "accepted"


async def _tries(host: InProcessHost) -> dict[str, str]:
    return {"peer listener": await _answer(lambda: asyncio.open_connection(host.addr, host.port)),
            "management socket": await _answer(lambda: asyncio.open_unix_connection(str(host.socket)))}


async def test_shutdown_refuses_new_connections_before_it_cancels_the_supervisors(pair, tmp_path: Path,
                                                                                 monkeypatch):
    primary, replica = pair
    image = tmp_path / "app.img"
    make_sparse_image(image, 1 * MiB, data_pieces=1)
    await enable(primary, replica, "app", image)
    await primary.api("POST", "/v1/replications/app/start-initial", {"wait": True})  # its supervisor runs
    engine = primary.host.primary
    assert await _tries(primary) == {"peer listener": "accepted", "management socket": "accepted"}

    seen: dict[str, object] = {}
    cancel_supervisors = engine.stop

    async def stop() -> None:  # shutdown's step that cancels the supervisors, entered
        seen["supervising"] = sum(not t.done() for t in engine._tasks.values())
        seen.update(await _tries(primary))
        await cancel_supervisors()
    monkeypatch.setattr(engine, "stop", stop)

    assert await primary.stop() == 0
    assert seen == {"supervising": 1, "peer listener": "refused", "management socket": "refused"}
