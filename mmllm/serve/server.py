"""Running the app: in the foreground until SIGINT/SIGTERM (the CLI), or in a thread (tests, notebooks)."""

from __future__ import annotations

import asyncio
import signal
import threading

from aiohttp import web


async def _start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1] if port == 0 else port  # port 0: the OS picks
    return runner, bound


async def serve_forever(app: web.Application, *, host: str = "127.0.0.1", port: int = 8000,
                        on_ready=None) -> None:
    """Serves ``app`` until SIGINT or SIGTERM, then stops accepting, lets the engine stop, returns.

    Args:
        on_ready: called with the bound port once the server accepts connections.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner, bound = await _start(app, host, port)
    if on_ready is not None:
        on_ready(bound)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()  # closes the sockets, cancels handlers, runs on_cleanup (engine stop)


class ServerThread:
    """Serves an app on an event loop in a background thread (``with ServerThread(app) as s: s.url``).

    Args:
        app: the aiohttp application (:func:`mmllm.serve.app.create_app`).
        host: interface to bind.
        port: 0 lets the OS pick a free port (see :attr:`port`).
    """

    def __init__(self, app: web.Application, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app, self.host, self.port = app, host, port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mmllm-server", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The OpenAI base URL (``http://host:port/v1``)."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> ServerThread:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(_start(self.app, self.host, self.port), self._loop)
        self._runner, self.port = fut.result(timeout=60)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=60)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
