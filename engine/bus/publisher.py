"""Asynchronous JetStream publishing whose futures also carry rejections.

nats-py's ``JetStreamContext.publish_async`` (2.16.0) leaves a message's
future pending when JetStream rejects the message, for example for a
``Nats-Expected-Last-Sequence`` that does not match the stream. Its reply
handler calls ``APIError.from_error``, which raises instead of returning
the error, so the error is logged as "nats: encountered error" and never
set on the future. The relay then waited for its ack timeout and reported
a timeout in place of the server's reason. ``AckPublisher`` sends the same
requests and sets each reply's error on its future.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError, ConnectionDrainingError
from nats.js import api
from nats.js.errors import APIError, NoStreamResponseError

# The status header value of a reply that no stream sent, because no stream
# stores the subject.
_NO_RESPONDERS = "503"


class AckPublisher:
    """A JetStream publisher over one connection that returns ack futures.

    Replies arrive on one wildcard subscription under a fresh inbox. Call
    ``close`` to drop that subscription and fail the futures still pending.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._inbox = client.new_inbox()
        self._futures: dict[str, asyncio.Future[api.PubAck]] = {}
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        self._subscription = await self._client.subscribe(
            f"{self._inbox}.*", cb=self._on_reply
        )

    async def publish(
        self, subject: str, body: bytes, headers: dict[str, str]
    ) -> asyncio.Future[api.PubAck]:
        """Send one message and return the future of its ack.

        The future raises ``APIError`` when JetStream rejects the message,
        and ``NoStreamResponseError`` when no stream stores ``subject``.
        """
        if self._subscription is None:
            raise RuntimeError("AckPublisher.start must be awaited first")
        token = secrets.token_hex(8)
        future: asyncio.Future[api.PubAck] = asyncio.get_running_loop().create_future()
        self._futures[token] = future
        future.add_done_callback(lambda _: self._futures.pop(token, None))
        try:
            await self._client.publish(
                subject, body, reply=f"{self._inbox}.{token}", headers=headers
            )
        except BaseException:
            # No reply can come for a message that was not sent.
            future.cancel()
            raise
        return future

    async def close(self) -> None:
        for future in list(self._futures.values()):
            future.cancel()
        subscription, self._subscription = self._subscription, None
        if subscription is None or self._client.is_closed:
            return
        # A closed or draining connection has dropped the subscription itself.
        with contextlib.suppress(ConnectionClosedError, ConnectionDrainingError):
            await subscription.unsubscribe()

    async def _on_reply(self, message: Msg) -> None:
        token = message.subject.rsplit(".", 1)[-1]
        future = self._futures.get(token)
        if future is None or future.done():
            return
        if message.headers and message.headers.get("Status") == _NO_RESPONDERS:
            future.set_exception(NoStreamResponseError())
            return
        try:
            reply = json.loads(message.data)
            if "error" in reply:
                error = reply["error"]
                future.set_exception(
                    APIError(
                        code=error.get("code"),
                        description=error.get("description"),
                        err_code=error.get("err_code"),
                    )
                )
                return
            future.set_result(api.PubAck.from_response(reply))
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            future.set_exception(
                APIError(description=f"invalid JetStream ack {message.data!r}: {error}")
            )
