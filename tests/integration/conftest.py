"""The clients of the in-process app a module's `app` fixture serves: httpx over ASGI, and the official
AsyncOpenAI client over it (a module may define its own `client` instead)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest_asyncio
from fastapi import FastAPI
from openai import AsyncOpenAI

from tests.inprocess import client_of, sdk_of


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_of(app, timeout=120) as http:
        yield http


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(app: FastAPI) -> AsyncIterator[AsyncOpenAI]:
    async with sdk_of(app) as client:
        yield client
