"""Open a local HTML file in the system's headless Chromium and report what a person's browser would see.

Driven through the Chrome DevTools Protocol over a websocket (aiohttp's client, already installed with Ray):
console messages and uncaught exceptions (Runtime, Log domains), every request the page makes (Network), and
whether each image decoded, then a full-page screenshot. Playwright and pyppeteer download their own browser,
which cannot happen here; Debian's `chromium` package is what the Makefile installs.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class PageVisit:
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL the page asked for beyond itself
    images: int = 0
    broken_images: list[str] = field(default_factory=list)
    screenshot: bytes = b""


def _launch(profile: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
         "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    port_file = Path(profile) / "DevToolsActivePort"
    deadline = time.time() + 60
    while time.time() < deadline:
        if port_file.exists() and len(lines := port_file.read_text().split()) == 2:
            return proc, f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode} before opening DevTools")
        time.sleep(0.1)
    _stop(proc)
    raise RuntimeError("chromium did not open DevTools within 60 s")


def _stop(proc: subprocess.Popen) -> None:
    """End Chromium and its helper processes (renderer, crashpad handler: its session), which write into the
    profile until they end (the profile's removal failed once with "Directory not empty")."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + 10
        while time.time() < deadline:
            proc.poll()  # reaps the leader
            if not _group_alive(proc.pid):
                return
            time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` is running (zombies waiting for a reaper do not write files)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


async def _visit(ws_url: str, url: str, width: int, height: int, timeout: float) -> PageVisit:
    visit, ids = PageVisit(), itertools.count(1)
    pending: dict[int, asyncio.Future] = {}
    loaded = asyncio.Event()
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:

        async def reader():
            async for msg in ws:
                m = json.loads(msg.data)
                if "id" in m and m["id"] in pending:
                    pending.pop(m["id"]).set_result(m)
                    continue
                method, p = m.get("method"), m.get("params", {})
                if method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert", "warning"):
                    visit.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
                elif method == "Runtime.exceptionThrown":
                    visit.console_errors.append(p["exceptionDetails"].get("text", "exception"))
                elif method == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                    visit.console_errors.append(p["entry"]["text"])
                elif method == "Network.requestWillBeSent" and p["request"]["url"] != url \
                        and not p["request"]["url"].startswith("data:"):
                    visit.requests.append(p["request"]["url"])
                elif method == "Page.loadEventFired":
                    loaded.set()

        async def call(method: str, session: str | None = None, **params) -> dict:
            i = next(ids)
            pending[i] = asyncio.get_running_loop().create_future()
            await ws.send_str(json.dumps({"id": i, "method": method, "params": params,
                                          **({"sessionId": session} if session else {})}))
            m = await asyncio.wait_for(pending[i], timeout)
            if "error" in m:
                raise RuntimeError(f"{method}: {m['error']}")
            return m.get("result", {})

        task = asyncio.create_task(reader())
        target = (await call("Target.createTarget", url="about:blank"))["targetId"]
        s = (await call("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            await call(f"{domain}.enable", s)
        await call("Emulation.setDeviceMetricsOverride", s, width=width, height=height, deviceScaleFactor=1,
                   mobile=False)
        await call("Page.navigate", s, url=url)
        await asyncio.wait_for(loaded.wait(), timeout)
        await asyncio.sleep(0.5)  # late console messages and requests
        images = (await call("Runtime.evaluate", s, returnByValue=True, expression=(
            "JSON.stringify(Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0]))"
        )))["result"]["value"]
        pairs = json.loads(images)
        visit.images = len(pairs)
        visit.broken_images = [alt for alt, ok in pairs if not ok]
        shot = await call("Page.captureScreenshot", s, format="png", captureBeyondViewport=True)
        visit.screenshot = base64.b64decode(shot["data"])
        task.cancel()
    return visit


def visit(html: Path, *, width: int = 1200, height: int = 900, timeout: float = 60) -> PageVisit:
    """Open `html` (a local file) in a fresh headless Chromium profile; what the page did, and a screenshot."""
    with tempfile.TemporaryDirectory(prefix="fpn-chromium-") as profile:
        proc, ws_url = _launch(profile)
        try:
            return asyncio.run(_visit(ws_url, Path(html).resolve().as_uri(), width, height, timeout))
        finally:
            _stop(proc)
