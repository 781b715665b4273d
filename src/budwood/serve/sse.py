"""Server-sent events for the streaming routes, as OpenAI sends them: `data: {json}` lines, then `data: [DONE]`."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator

from budwood.errors import BudwoodError
from budwood.serve.errors import error_content


def _data(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


async def stream_response(chunks: AsyncIterator[dict]):
    """An SSE response ending with [DONE]. The first chunk is awaited first, so a request that fails at
    once (queue full, prompt too long) gets a plain error response with its HTTP status; a failure
    later is sent as one more event holding the error object."""
    from sse_starlette.sse import EventSourceResponse

    first = await anext(chunks, None)

    async def events():
        try:
            if first is not None:
                yield {"data": _data(first)}
            async for chunk in chunks:
                yield {"data": _data(chunk)}
        except BudwoodError as e:
            yield {"data": _data(error_content(e)[1])}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), ping=15, sep="\n")
