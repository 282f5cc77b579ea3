"""The hot path's one disconnect watch per request (gateway/api/hotpath.py): a client that leaves cancels the
request's own task while it is armed (dispatch, the stream), never outside it, and the task then ends quietly."""

import asyncio

import pytest

from gridserve.gateway.api.hotpath import _DisconnectWatch


class Client:
    """An ASGI `receive` whose client disconnects when told to."""

    def __init__(self) -> None:
        self.left = asyncio.Event()

    async def receive(self) -> dict[str, object]:
        await self.left.wait()
        return {"type": "http.disconnect"}


def test_a_disconnect_while_armed_cancels_the_request_which_then_ends_quietly() -> None:
    async def request(client: Client) -> str:
        with _DisconnectWatch(client.receive) as watch:
            try:
                watch.arm()
                await asyncio.sleep(10)  # waiting for the node's first token
            except asyncio.CancelledError:
                assert watch.gone()
                return "ended quietly"
            finally:
                watch.disarm()
        return "finished"

    async def main() -> tuple[str, int]:
        client = Client()
        task = asyncio.create_task(request(client))
        await asyncio.sleep(0.01)
        client.left.set()
        outcome = await asyncio.wait_for(task, 2)
        return outcome, task.cancelling()

    assert asyncio.run(main()) == ("ended quietly", 0)  # the cancellation it caused is taken back


def test_a_disconnect_while_disarmed_cancels_nothing_and_arming_afterwards_stops_at_once() -> None:
    async def request(client: Client) -> list[str]:
        seen = []
        with _DisconnectWatch(client.receive) as watch:
            client.left.set()
            await asyncio.sleep(0.01)  # disarmed: between the first token and the stream
            seen.append("not cancelled")
            with pytest.raises(asyncio.CancelledError):
                watch.arm()
            seen.append("gone" if watch.gone() else "here")
        return seen

    assert asyncio.run(request(Client())) == ["not cancelled", "gone"]


def test_a_cancellation_from_elsewhere_is_not_mistaken_for_the_client() -> None:
    async def request(client: Client) -> None:
        with _DisconnectWatch(client.receive) as watch:
            try:
                watch.arm()
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                assert not watch.gone()
                raise

    async def main() -> bool:
        task = asyncio.create_task(request(Client()))
        await asyncio.sleep(0.01)
        task.cancel()  # the server shutting down
        with pytest.raises(asyncio.CancelledError):
            await task
        return task.cancelled()

    assert asyncio.run(main())
