"""Waiting on a job while watching the client: one that hangs up cancels its generation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from .jobs import Event, Failed, Job

T = TypeVar("T")
POLL_S = 0.2


async def until_done(request: Request, job: Job, result: Awaitable[T]) -> T:
    """`result`, unless the client disconnects first: then the job is cancelled."""
    task = asyncio.ensure_future(result)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                job.cancel()
    finally:
        if not task.done():
            task.cancel()
            job.cancel()


async def first_event(request: Request, job: Job) -> Event:
    """The first event of a stream, before the response starts: an error that comes first is
    still an HTTP status, not a 200 carrying an error frame."""
    events = job.events()
    event = await until_done(request, job, events.__anext__())
    if isinstance(event, Failed):
        raise event.error
    return event
