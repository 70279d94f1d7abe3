"""The labelling web server (aiohttp): one page per comparison, each answer stored before the next.

Routes (relative to the server root):

* ``GET /``: the next pending comparison of the round (or the "done" page);
* ``POST /label`` (form ``id``, ``label``): stores the answer, then redirects (303) to ``/``;
* ``POST /undo``: the labeller's last answer becomes pending again, then redirects to ``/``;
* ``GET /api/progress``: ``{"answered", "total", "done"}`` as JSON.

Security: the server binds 127.0.0.1 by default. Bound to any other address it refuses to start
without a labeller token; with a token every request needs it (``Authorization: Bearer <token>``,
or ``?token=<token>`` once, which sets an HttpOnly SameSite=Strict cookie), else 401. A POST whose
``Origin`` is not this server is refused (403): another web page cannot answer for the labeller.

Run alone: ``python -m mmllm.rlhf.label_server --db labels.sqlite --round 0 [--host --port --token]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import os
import signal
import sys
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from mmllm.rlhf.labels import LABELS, LabelStore
from mmllm.rlhf.page import render_comparison, render_done

COOKIE = "mmllm_label_token"
STORE_KEY = web.AppKey("store", LabelStore)
STATE_KEY = web.AppKey("state", dict)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: may resolve to anything
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuses to serve a non-loopback address without a labeller token."""
    if not is_loopback(host) and not token:
        raise ValueError(f"the labelling page would be bound to {host!r}, which other machines can "
                         "reach, without a token: set a labeller token (token=... or "
                         "$MMLLM_LABEL_TOKEN), or bind 127.0.0.1 and use an SSH tunnel")


@web.middleware
async def _guard(request: web.Request, handler):
    """Token check (when a token is set) and same-origin check of POSTs."""
    token = request.app[STATE_KEY]["token"]
    if token:
        given = request.query.get("token") or request.cookies.get(COOKIE) or ""
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth.removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise web.HTTPUnauthorized(text="401: a labeller token is required (open the URL with "
                                            "?token=<token>)")
        if "token" in request.query and request.method == "GET":  # keep it out of the URL bar
            resp = web.HTTPSeeOther(request.rel_url.with_query(None))
            resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict")
            raise resp
    origin = request.headers.get("Origin")
    if request.method == "POST" and origin and origin != "null" and urlsplit(origin).netloc != request.host:
        raise web.HTTPForbidden(text=f"403: a POST from another origin ({origin}) is refused")
    return await handler(request)


async def _page(request: web.Request) -> web.Response:
    store, state = request.app[STORE_KEY], request.app[STATE_KEY]
    answered, total = store.progress(state["round"])
    c = store.next_pending(state["round"])
    kw = {"answered": answered, "total": total, "labeller": state["labeller"]}
    html = render_comparison(c, **kw) if c else render_done(round=state["round"], **kw)
    return web.Response(text=html, content_type="text/html",
                        headers={"Cache-Control": "no-store",
                                 # Inline style/script only; nothing loads from elsewhere.
                                 "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                 "script-src 'unsafe-inline'; form-action 'self'"})


async def _label(request: web.Request) -> web.Response:
    store, state = request.app[STORE_KEY], request.app[STATE_KEY]
    form = await request.post()
    cid, label = str(form.get("id", "")), str(form.get("label", ""))
    if label not in LABELS:
        raise web.HTTPBadRequest(text=f"400: label must be one of {LABELS}, got {label!r}")
    c = store.get(cid)
    if c is None or c.round != state["round"]:
        raise web.HTTPNotFound(text=f"404: no comparison {cid!r} in round {state['round']}")
    # The commit (fsync) happens in a worker thread so the event loop keeps serving.
    await asyncio.to_thread(store.answer, cid, label, labeller=state["labeller"], source="human")
    state["answers"] += 1
    _maybe_done(request.app)
    raise web.HTTPSeeOther("./")


async def _undo(request: web.Request) -> web.Response:
    store, state = request.app[STORE_KEY], request.app[STATE_KEY]
    await asyncio.to_thread(store.undo_last, state["round"], labeller=state["labeller"])
    raise web.HTTPSeeOther("./")


async def _progress(request: web.Request) -> web.Response:
    store, state = request.app[STORE_KEY], request.app[STATE_KEY]
    answered, total = store.progress(state["round"])
    return web.json_response({"answered": answered, "total": total, "done": answered >= total})


def _maybe_done(app: web.Application) -> None:
    """Stops a server told to stop when the round is answered, once it is."""
    state = app[STATE_KEY]
    answered, total = app[STORE_KEY].progress(state["round"])
    if answered >= total and state["stop"] is not None and state["stop_when_done"]:
        state["stop"].set()


def create_label_app(store: LabelStore, round: int, *, labeller: str = "human",
                     token: str | None = None) -> web.Application:
    """The labelling app for ``round`` of ``store``.

    Args:
        labeller: the name stored with every answer (and whose answers ``undo`` takes back).
        token: the labeller token every request must carry (None: no check; loopback only,
            enforced by :func:`serve_labels`).
    """
    app = web.Application(middlewares=[_guard], client_max_size=64 * 1024)
    app[STORE_KEY] = store
    app[STATE_KEY] = {"round": round, "labeller": labeller, "token": token, "answers": 0,
                      "stop": None, "stop_when_done": False, "stopped": False}
    app.router.add_get("/", _page)
    app.router.add_post("/label", _label)
    app.router.add_post("/undo", _undo)
    app.router.add_get("/api/progress", _progress)
    return app


async def _serve(app: web.Application, host: str, port: int, *, stop_when_done: bool,
                 poll_s: float, linger_s: float, on_ready) -> None:
    state = app[STATE_KEY]
    stop = asyncio.Event()
    state["stop"], state["stop_when_done"] = stop, stop_when_done

    def on_signal() -> None:
        state["stopped"] = True
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (RuntimeError, ValueError):  # not the main thread: the caller stops us otherwise
            break
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    if on_ready is not None:
        on_ready(site._server.sockets[0].getsockname()[1])  # the bound port (port 0: the OS picks)
    try:
        while not stop.is_set():
            _maybe_done(app)  # another writer (a second labeller, a judge) may finish the round
            try:
                await asyncio.wait_for(stop.wait(), poll_s)
            except TimeoutError:
                pass
        if not state["stopped"]:
            await asyncio.sleep(linger_s)  # the redirect after the last answer gets its "done" page
    finally:
        await runner.cleanup()


def serve_labels(store: LabelStore, round: int, *, host: str = "127.0.0.1", port: int = 8008,
                 token: str | None = None, labeller: str = "human", stop_when_done: bool = True,
                 poll_s: float = 1.0, linger_s: float = 1.0, on_ready=None) -> dict:
    """Serves the labelling page in the foreground until the round is answered (or SIGINT/SIGTERM).

    Args:
        host: the address to bind; anything but loopback needs ``token``.
        port: the port (0: any free one, passed to ``on_ready``).
        token: the labeller token (default ``$MMLLM_LABEL_TOKEN``).
        stop_when_done: return once every comparison of the round is answered.
        poll_s: how often the store is checked for answers from other writers.
        linger_s: seconds served after the last answer (the browser's "done" page).
        on_ready: called with the bound port once the server accepts connections.

    Returns:
        ``{"answered", "total", "answers", "stopped_early", "stopped_by_signal"}``.
    """
    token = token or os.environ.get("MMLLM_LABEL_TOKEN") or None
    check_bind(host, token)
    app = create_label_app(store, round, labeller=labeller, token=token)
    asyncio.run(_serve(app, host, port, stop_when_done=stop_when_done, poll_s=poll_s, linger_s=linger_s,
                       on_ready=on_ready))
    answered, total = store.progress(round)
    return {"answered": answered, "total": total, "answers": app[STATE_KEY]["answers"],
            "stopped_early": answered < total, "stopped_by_signal": app[STATE_KEY]["stopped"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mmllm.rlhf.label_server", description=__doc__.split("\n")[0])
    p.add_argument("--db", required=True, type=Path, help="the label store (SQLite)")
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8008)
    p.add_argument("--token", default=None, help="labeller token (default $MMLLM_LABEL_TOKEN)")
    p.add_argument("--labeller", default="human")
    p.add_argument("--keep-serving", action="store_true", help="do not stop when the round is done")
    args = p.parse_args(argv)
    with LabelStore(args.db) as store:
        def ready(port: int) -> None:
            print(f"labelling round {args.round} at http://{args.host}:{port}/", flush=True)

        try:
            result = serve_labels(store, args.round, host=args.host, port=args.port, token=args.token,
                                  labeller=args.labeller, stop_when_done=not args.keep_serving,
                                  on_ready=ready)
        except ValueError as e:
            sys.exit(f"error: {e}")
    print(f"answered {result['answered']} of {result['total']}", flush=True)


if __name__ == "__main__":
    main()
