"""The labelling page (mmllm.rlhf.label_server): driven in headless Chromium over the DevTools
protocol (aiohttp's websocket client), the server in a subprocess killed with SIGKILL mid-session;
the token rules; HTML escaping of hostile responses."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Self

import aiohttp
import httpx
import pytest

from mmllm.rlhf.label_server import check_bind, create_label_app
from mmllm.rlhf.labels import LabelStore
from mmllm.serve import ServerThread

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh "
                                                             "installs it): the browser tests need it")
HOSTILE = "<script>window.__pwned = 1</script><img src=x onerror='window.__pwned = 2'>"
PAIRS = [("Say hi", HOSTILE, "hello"), ("2+2?", "4", "five"), ("Capital of France?", "Paris", "Rome"),
         ("Colour of the sky?", "blue", "green"), ("A fruit?", "apple", "rock")]


def _store(path: Path) -> LabelStore:
    store = LabelStore(path)
    store.add_comparisons(0, PAIRS)
    return store


@pytest.fixture
def db(tmp_path) -> Path:
    _store(tmp_path / "labels.sqlite").close()
    return tmp_path / "labels.sqlite"


# --------------------------------------------------------------------------- HTTP level
def test_page_escapes_hostile_responses_and_posts_store_before_redirect(db):
    with LabelStore(db) as store, ServerThread(create_label_app(store, 0, labeller="ann")) as s:
        base = f"http://127.0.0.1:{s.port}"
        page = httpx.get(base + "/").text
        assert "<script>window.__pwned" not in page and "&lt;script&gt;window.__pwned" in page
        assert "<img" not in page and "&lt;img src=x onerror=" in page
        assert "0 of 5 answered" in page
        assert "http://" not in page and "https://" not in page  # self-contained: nothing to fetch
        first = store.next_pending(0).id
        r = httpx.post(base + "/label", data={"id": first, "label": "b"})
        assert r.status_code == 303 and store.get(first).label == "b"  # stored before the redirect
        assert "1 of 5 answered" in httpx.get(base + "/").text
        assert httpx.post(base + "/label", data={"id": first, "label": "maybe"}).status_code == 400
        assert httpx.post(base + "/label", data={"id": "nope", "label": "a"}).status_code == 404
        evil = httpx.post(base + "/label", data={"id": first, "label": "a"},
                          headers={"Origin": "http://evil.example"})
        assert evil.status_code == 403 and store.get(first).label == "b"
        assert httpx.get(base + "/api/progress").json() == {"answered": 1, "total": 5, "done": False}


def test_token_required_off_loopback_and_enforced(db):
    with pytest.raises(ValueError, match="token"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "secret")
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    proc = subprocess.run([sys.executable, "-m", "mmllm.rlhf.label_server", "--db", str(db), "--round", "0",
                           "--host", "0.0.0.0", "--port", "0"], check=False, capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "MMLLM_LABEL_TOKEN"})
    assert proc.returncode != 0 and "without a token" in proc.stderr
    with LabelStore(db) as store, ServerThread(create_label_app(store, 0, token="secret")) as s:
        base = f"http://127.0.0.1:{s.port}"
        assert httpx.get(base + "/").status_code == 401
        assert httpx.get(base + "/api/progress", headers={"Authorization": "Bearer wrong"}).status_code == 401
        first = store.next_pending(0).id
        assert httpx.post(base + "/label", data={"id": first, "label": "a"}).status_code == 401
        assert store.get(first).label is None
        assert httpx.get(base + "/", headers={"Authorization": "Bearer secret"}).status_code == 200
        with httpx.Client(base_url=base) as browser:  # ?token= once, then the cookie
            r = browser.get("/?token=secret")
            assert r.status_code == 303 and "token" not in r.headers["location"]
            assert "httponly" in r.headers["set-cookie"].lower()
            assert browser.get("/").status_code == 200
            assert browser.post("/label", data={"id": first, "label": "a"}).status_code == 303
        assert store.get(first).label == "a"


# ------------------------------------------------------------------------------ browser
class DevTools:
    """A headless Chromium page driven over the DevTools protocol."""

    def __init__(self, tmp: Path) -> None:
        self.profile, self._id = tmp / "profile", 0
        self.proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                                      "--no-first-run", "--remote-debugging-port=0",
                                      f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def __aenter__(self) -> Self:
        profile = self.profile
        port_file = profile / "DevToolsActivePort"
        await self._until(lambda: port_file.exists() and port_file.read_text().strip(), "DevTools port")
        port = int(port_file.read_text().split()[0])
        self.http = aiohttp.ClientSession()

        async def page_target():
            try:
                async with self.http.get(f"http://127.0.0.1:{port}/json/list") as r:
                    return next((t for t in await r.json() if t["type"] == "page"), None)
            except aiohttp.ClientError:
                return None

        target = await self._until_async(page_target, "a page target")
        self.ws = await self.http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()
        await self.http.close()
        self.proc.kill()
        self.proc.wait(30)

    @staticmethod
    async def _until(cond, what: str, timeout: float = 60.0):
        async def check():
            return cond()

        return await DevTools._until_async(check, what, timeout)

    @staticmethod
    async def _until_async(cond, what: str, timeout: float = 60.0):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout  # a generous bound against a hang, not a speed check
        while loop.time() < deadline:
            if value := await cond():
                return value
            await asyncio.sleep(0.05)
        raise TimeoutError(f"chromium: no {what} after {timeout} s")

    async def send(self, method: str, **params) -> dict:
        self._id += 1
        await self.ws.send_json({"id": self._id, "method": method, "params": params})
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def eval(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self._until_async(lambda: self.eval("document.readyState === 'complete' && "
                                                  "!!document.getElementById('progress')"), "page load")

    async def press(self, key: str) -> None:
        for kind in ("keyDown", "keyUp"):
            await self.send("Input.dispatchKeyEvent", type=kind, key=key, text=key if kind == "keyDown" else "")

    async def answered(self) -> int:
        return int(await self.eval("document.readyState === 'complete' && document.getElementById('progress') "
                                   "? document.getElementById('progress').dataset.answered : -1"))

    async def press_until(self, key: str, answered: int) -> None:
        """Presses ``key`` and waits for the page that shows ``answered`` answers."""
        await self.press(key)
        await self._until_async(lambda: self._is(answered), f"page with {answered} answered")

    async def _is(self, answered: int) -> bool:
        try:
            return await self.answered() == answered
        except (RuntimeError, TypeError, ValueError):  # mid-navigation
            return False


def _start_server(db: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "mmllm.rlhf.label_server", "--db", str(db), "--round", "0",
                             "--port", "0", "--labeller", "ann"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "http://" in line, line
    return proc, line.split(" at ")[1].strip()


@needs_chromium
@pytest.mark.slow
def test_keyboard_labelling_in_chromium_survives_sigkill_and_resumes(db, tmp_path):
    """1/2/3/u/s in the browser; each answer is in the DB when the next pair shows; SIGKILL keeps
    them; a restarted server continues the round."""
    proc, url = _start_server(db)
    reader = LabelStore(db)
    browser = DevTools(tmp_path)
    try:
        async def session() -> dict:
            async with browser as page:
                await page.goto(url)
                seen = {"pwned": await page.eval("window.__pwned === undefined ? null : window.__pwned"),
                        "shown_a": await page.eval("document.getElementById('response-a').textContent")}
                for key, n in (("1", 1), ("2", 2), ("3", 3)):
                    await page.press_until(key, n)
                    assert reader.progress(0)[0] == n  # stored before the next pair was shown
                await page.press_until("u", 2)  # undo the tie: its pair shows again
                seen["after_undo"] = await page.eval("document.getElementById('prompt').textContent")
                await page.press_until("s", 3)
                return seen

        seen = asyncio.run(session())
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no shutdown path runs
        proc.wait(30)
        reader.close()
    assert proc.returncode == -signal.SIGKILL
    assert seen["pwned"] is None and seen["shown_a"] == HOSTILE  # shown as text, never run
    assert seen["after_undo"] == PAIRS[2][0]
    with LabelStore(db) as store:  # reopened after the kill
        labels = [(c.prompt, c.label, c.labeller, c.source) for c in store.comparisons(0)]
    assert labels == [("Say hi", "a", "ann", "human"), ("2+2?", "b", "ann", "human"),
                      ("Capital of France?", "skip", "ann", "human"),
                      ("Colour of the sky?", None, None, None), ("A fruit?", None, None, None)]

    # A new server on the same file resumes where the killed one stopped and ends on its own
    # once the round is answered, after the browser got the "done" page.
    proc, url = _start_server(db)
    browser = DevTools(tmp_path / "again")
    try:
        async def finish() -> bool:
            async with browser as page:
                await page.goto(url)
                assert await page.answered() == 3
                await page.press_until("1", 4)
                await page.press_until("2", 5)
                return bool(await page.eval("!!document.getElementById('done')"))

        assert asyncio.run(finish())
        assert proc.wait(60) == 0 and "answered 5 of 5" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
    with LabelStore(db) as store:
        assert store.progress(0) == (5, 5) and store.comparisons(0)[-1].label == "b"
