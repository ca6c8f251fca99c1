"""The page of `charlm serve` in a real headless Chromium: type a prompt, press Generate, watch the text
stream in; fill a blank. Screenshots (streaming.png, page.png) go to the test's tmp_path.

The tiny model writes 1000 characters in well under a second, quicker than a busy machine may schedule the
browser, so the page talks to the server through a proxy that holds the stream after its first events until
the test has seen them on the page: text shown while the rest is held back can only have been streamed."""

import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")
httpx = pytest.importorskip("httpx")

from helpers import ServerProcess  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium_path() -> str:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("Chromium is not installed (apt-get install chromium)")


HELD_AFTER_EVENTS = 20


class GatedProxy(ThreadingHTTPServer):
    """Forwards requests to `upstream`; a streamed answer pauses after HELD_AFTER_EVENTS events until `gate`."""

    daemon_threads = True

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream
        self.gate = threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._forward(None)

    def do_POST(self) -> None:
        self._forward(self.rfile.read(int(self.headers["Content-Length"])))

    def _forward(self, body: bytes | None) -> None:
        method = "GET" if body is None else "POST"
        headers = {"Content-Type": self.headers.get("Content-Type", "application/json")}
        with httpx.stream(method, self.server.upstream + self.path, content=body, headers=headers,
                          timeout=60) as response:
            self.send_response(response.status_code)
            self.send_header("Content-Type", response.headers["content-type"])
            self.end_headers()  # HTTP/1.0: the body ends when the connection closes
            events = 0
            for line in response.iter_lines():
                self.wfile.write((line + "\n").encode())
                self.wfile.flush()
                events += line.startswith("data: ")
                if events == HELD_AFTER_EVENTS:
                    self.server.gate.wait(60)


@pytest.fixture(scope="module")
def proxy(serve_checkpoint):
    server = ServerProcess(serve_checkpoint)
    gated = GatedProxy(server.url)
    thread = threading.Thread(target=gated.serve_forever, daemon=True)
    thread.start()
    yield gated
    gated.shutdown()
    server.stop()


def test_page_streams_generated_text_and_fills_a_blank(proxy, tmp_path):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.goto(proxy.url + "/")
            page.fill("#prompt", "I love")
            page.fill("#length", "1000")  # a range input takes its value as text
            page.click("#generate")
            page.wait_for_function("document.getElementById('output').textContent.length > 'I love'.length + 5")
            partial = page.locator("#output").text_content()
            assert page.locator("#status").text_content().startswith("generating")
            assert page.locator("#stop").is_enabled()
            page.screenshot(path=str(tmp_path / "streaming.png"))
            proxy.gate.set()
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')",
                                   timeout=60_000)
            final = page.locator("#output").text_content()
            assert final.startswith(partial) and len(final) == len("I love") + 1000 > len(partial)
            page.fill("#blank", "I love machine ___")
            page.click("#fill")
            page.wait_for_selector("#fillers tr")
            words = page.locator("#fillers td.word").all_text_contents()
            assert words and all(word.strip() for word in words)
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "streaming.png").stat().st_size > 0 and (tmp_path / "page.png").stat().st_size > 0
