"""A finetune run as MLflow's UI shows it: `mlflow server` on loopback over a store, the run's
"Model metrics" page opened in headless Chromium, a screenshot once its charts are drawn.

    .venv/bin/python benchmarks/mlflow_screenshot.py --store sqlite:////abs/path/mlflow.db \\
        [--run-id ID] [--out docs/mlflow-run.png] [--width 1400 --height 1900]

Without --run-id: the newest finished finetune run of the store. Prints what the page
showed (its chart sections, the view) and writes the PNG. Needs a Chromium (Debian:
``apt-get install chromium``; or $LONGTUNE_CHROMIUM naming the binary); it is driven over
its DevTools protocol with aiohttp's websocket client (aiohttp comes with Ray), so no
browser driver package is needed. tests/test_mlflow_ui.py uses the same pieces.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "headless_shell")

# What the page shows, read in the page: the chart sections' headers ("eval (8)"), the charts
# drawn (plotly's), its text (a drawn chart's legend reads "<run name> (train/loss)").
PAGE_STATE_JS = """(() => {
  const text = (el) => (el.innerText || el.textContent || '').trim();
  const sections = [...document.querySelectorAll('[data-testid="experiment-view-compare-runs-section-header"]')]
    .map((el) => text(el).replace(/\\s+/g, ' ').replace(/ Add chart$/, ''));
  const charts = [...document.querySelectorAll('.js-plotly-plot')].filter((el) => el.querySelector('.main-svg')).length;
  return JSON.stringify({title: document.title, sections, charts, body: text(document.body)});
})()"""
# MLflow's assistant panel takes a third of the page; plotly's tool bars cover the curves
TIDY_JS = """(() => {
  const b = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (b) b.click();
  const style = document.createElement('style');
  style.textContent = '.modebar-container { display: none !important; }';
  document.head.appendChild(style);
  return Boolean(b);
})()"""


def find_chromium() -> str | None:
    """$LONGTUNE_CHROMIUM, else the first Chromium-like binary on PATH, else None."""
    chosen = os.environ.get("LONGTUNE_CHROMIUM")
    if chosen:
        return chosen if shutil.which(chosen) else None
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the server


class MlflowServer:
    """`mlflow server` on 127.0.0.1 over ``store`` (a tracking URI), in its own process group,
    stopped (the whole group) on exit. ``url`` is its address once ``start`` returned."""

    def __init__(self, store: str, log_path: str | os.PathLike[str], port: int | None = None,
                 timeout: float = 120.0) -> None:
        self.store, self.log_path, self.timeout = store, Path(log_path), timeout
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        mlflow = Path(sys.executable).with_name("mlflow")
        argv = [str(mlflow) if mlflow.exists() else "mlflow", "server", "--host", "127.0.0.1",
                "--port", str(self.port), "--backend-store-uri", self.store, "--workers", "1"]
        # one worker and no job runner (GenAI's scheduled scorers): on two cores each extra
        # process of MLflow's takes a minute to import; no telemetry, there is no network
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self._log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.url} in {self.timeout:.0f} s:\n{self._log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)  # its workers too
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- the browser


@dataclass
class Page:
    title: str
    sections: list[str]  # chart sections' headers, e.g. "eval (8)"
    charts: int  # charts drawn
    body: str  # the page's text; a drawn chart's legend reads "<run name> (train/loss)"
    png: bytes | None


def open_page(url: str, *, chromium: str, want: list[str], charts: bool = True, width: int = 1400,
              height: int = 1500, timeout: float = 90.0, screenshot: bool = True, settle: float = 1.5) -> Page:
    """Open ``url`` in a fresh headless Chromium and wait until every text of ``want`` is on
    the page and (``charts``) a chart is drawn, or ``timeout`` passed (then: the page as it
    is); then read it and, with ``screenshot``, take one. MLflow's assistant panel, if open,
    is closed first."""
    return asyncio.run(_open_page(url, chromium, want, charts, width, height, timeout, screenshot, settle))


async def _open_page(url, chromium, want, charts, width, height, timeout, screenshot, settle) -> Page:
    import aiohttp

    with tempfile.TemporaryDirectory(prefix="longtune-chromium-") as profile:
        argv = [chromium, "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            argv.insert(1, "--no-sandbox")  # Chromium refuses root without it
        browser = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            port = await _devtools_port(Path(profile) / "DevToolsActivePort", browser, timeout=30)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                    targets = await response.json(content_type=None)
                page_ws = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
                async with http.ws_connect(page_ws, max_msg_size=0) as ws:
                    cdp = _Cdp(ws)
                    await cdp.call("Emulation.setDeviceMetricsOverride",
                                   width=width, height=height, deviceScaleFactor=1, mobile=False)
                    await cdp.call("Page.enable")
                    await cdp.call("Page.navigate", url=url)
                    await _wait_for(cdp, want, charts, timeout)
                    await cdp.evaluate(TIDY_JS)
                    await asyncio.sleep(settle)  # plotly's last frame, the layout after the panel closed
                    state = json.loads(await cdp.evaluate(PAGE_STATE_JS))
                    png = None
                    if screenshot:
                        shot = await cdp.call("Page.captureScreenshot", format="png")
                        png = base64.b64decode(shot["data"])
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(browser.pid, signal.SIGTERM)
            try:
                browser.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(browser.pid, signal.SIGKILL)
                browser.wait(timeout=10)
    return Page(state["title"], state["sections"], state["charts"], state["body"], png)


async def _devtools_port(path: Path, browser: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if browser.poll() is not None:
            raise RuntimeError(f"chromium exited with {browser.returncode} before opening its DevTools port")
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(path.read_text().splitlines()[0])
        await asyncio.sleep(0.2)
    raise RuntimeError(f"chromium opened no DevTools port in {timeout:.0f} s")


async def _wait_for(cdp: _Cdp, want: list[str], charts: bool, timeout: float) -> dict:
    """Poll the page until all of ``want`` is in its text and (``charts``) a chart is drawn."""
    deadline = time.monotonic() + timeout
    state: dict = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(RuntimeError, TypeError, ValueError):
            state = json.loads(await cdp.evaluate(PAGE_STATE_JS))
            if (state["charts"] or not charts) and all(w in state["body"] for w in want):
                return state
        await asyncio.sleep(0.5)
    return state


class _Cdp:
    """Calls over one DevTools websocket; events are read and dropped."""

    def __init__(self, ws) -> None:
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = json.loads((await self.ws.receive()).data)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(str(result["exceptionDetails"])[:500])
        return result["result"].get("value")


# ---------------------------------------------------------------- a run's page


def newest_finetune_run(store: str) -> tuple[str, str] | None:
    """(experiment id, run id) of the store's newest finished finetune run, or None."""
    from mlflow import MlflowClient

    client = MlflowClient(store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.`longtune.job` = 'finetune' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return (runs[0].info.experiment_id, runs[0].info.run_id) if runs else None


def small_png(png: bytes, colors: int = 96) -> bytes:
    """The screenshot in a palette of ``colors`` (a page of flat colours and thin lines loses
    nothing visible; the file shrinks several times), for the README."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def main(argv: list[str]) -> int:
    from longtune.tracking import run_url

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="tracking URI of the store, e.g. sqlite:////abs/mlflow.db")
    parser.add_argument("--run-id", help="the run (default: the newest finished finetune run)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "mlflow-run.png"))
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1900)
    args = parser.parse_args(argv)

    chromium = find_chromium()
    if chromium is None:
        print("no Chromium found: apt-get install chromium, or set LONGTUNE_CHROMIUM", file=sys.stderr)
        return 2
    if args.run_id:
        from mlflow import MlflowClient

        run = MlflowClient(args.store).get_run(args.run_id)
        ids = (run.info.experiment_id, run.info.run_id)
    else:
        ids = newest_finetune_run(args.store)
        if ids is None:
            print(f"no finished finetune run in {args.store}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="longtune-mlflow-ui-") as tmp, \
            MlflowServer(args.store, Path(tmp) / "server.log") as server:
        url = run_url(server.url, *ids)
        page = open_page(url, chromium=chromium, want=["(train/loss)"], width=args.width, height=args.height)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(small_png(page.png))
    print(f"run {ids[1]}: {page.title!r}")
    print(f"chart sections: {', '.join(page.sections)}; {page.charts} charts drawn")
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
