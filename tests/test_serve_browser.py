"""The page of `charlm serve` in a real headless Chromium: type a prompt, press Generate, watch the text
stream in; fill a blank. Screenshots (generated.png, page.png) go to the test's tmp_path."""

import shutil
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from helpers import ServerProcess  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium_path() -> str:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("Chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def page_url(serve_checkpoint):
    server = ServerProcess(serve_checkpoint)
    yield server.url + "/"
    server.stop()


def test_page_streams_generated_text_and_fills_a_blank(page_url, tmp_path):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.goto(page_url)
            page.fill("#prompt", "I love")
            page.fill("#length", "1000")  # a range input takes its value as text
            # Every change to the output as it happens: streamed text grows in many steps, not all at once.
            page.evaluate("""() => {
                const output = document.getElementById('output');
                window.seenLengths = [];
                new MutationObserver(() => window.seenLengths.push(output.textContent.length))
                    .observe(output, {childList: true, subtree: true, characterData: true});
            }""")
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')",
                                   timeout=60_000)
            final = page.locator("#output").text_content()
            assert final.startswith("I love") and len(final) >= len("I love") + 1000
            seen = page.evaluate("window.seenLengths")
            assert seen == sorted(seen) and len(set(seen)) >= 3 and seen[-1] == len(final), seen
            page.screenshot(path=str(tmp_path / "generated.png"))
            page.fill("#blank", "I love machine ___")
            page.click("#fill")
            page.wait_for_selector("#fillers tr")
            words = page.locator("#fillers td.word").all_text_contents()
            assert words and all(word.strip() for word in words)
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "generated.png").stat().st_size > 0 and (tmp_path / "page.png").stat().st_size > 0
