"""A new user's tour of the app in headless Chromium, on builtin:toy; writes the README's screenshots.

    python -m bench.app_tour [--out docs] [--port 7861]

Starts ``python app.py`` with its defaults (builtin:toy) on an empty data folder of its own, drops the
photos and ``photo.txt`` captions of two shapes the model never saw (``toy.scenes.write_concept_images``)
on the Train tab, trains each (about two minutes each on a 2-core CPU), then draws "a red <heart> on the
left and a blue <moon> on the right" with the left-right layout, 4 images (concepts picked by their
cards). Writes ``app-train.png`` and ``app-screenshot.png`` to ``--out``; fails on an error shown on the
page. Needs Debian's chromium and the playwright package, as ``tests/test_browser.py``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from toy.scenes import write_concept_images

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SHAPES = ("heart", "moon")
PROMPT = "a red <heart> on the left and a blue <moon> on the right on a white background"
TIMEOUT_MS = 600_000


def start_app(work: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "XDG_DATA_HOME": str(work / "data"), "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(work / "app.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=work, stdout=log, stderr=log, env=env
    )
    deadline = time.monotonic() + 180
    while "running at" not in (work / "app.log").read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the app did not start: " + (work / "app.log").read_text(errors="replace")[-2000:])
        time.sleep(0.5)
    return process


def train(page, expect, photos: Path, name: str) -> None:
    files = sorted(photos.glob("*.png")) + sorted(photos.glob("*.txt"))
    page.locator("#train-images input[type=file]").set_input_files([str(f) for f in files])
    expect(page.locator("#train-thumbnails img")).to_have_count(len(files) // 2)
    page.locator("#train-name textarea, #train-name input").first.fill(name)
    if not page.locator("#train-captions").is_visible():
        page.get_by_text("Advanced").first.click()
    expect(page.locator("#train-captions")).to_contain_text("{token}")  # the caption files filled the table
    started = time.monotonic()
    page.click("#train-button")
    expect(page.locator("#train-result")).to_contain_text(f"Trained {name}", timeout=TIMEOUT_MS)
    print(f"{name} trained in {time.monotonic() - started:.0f} s", flush=True)


def tour(url: str, work: Path, out: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_selector("#train-button")
        for shape in SHAPES:
            photos = work / "photos" / shape
            write_concept_images(shape, photos)
            train(page, expect, photos, shape)
        page.screenshot(path=str(out / "app-train.png"), full_page=True)
        page.get_by_role("tab", name="Generate").click()
        page.locator("#generate-prompt textarea").fill(PROMPT)
        for index in range(len(SHAPES)):  # a card click selects its concept
            page.locator("#generate-cards img").nth(index).click()
        page.locator("#generate-prompt textarea").fill(PROMPT)
        page.locator("#layout-mode").get_by_text("left-right", exact=True).click()
        count = page.locator("#gen-images input[type=number]").first
        count.fill("4")
        count.press("Tab")
        page.click("#generate-button")
        expect(page.locator("#generate-info")).to_contain_text("4 image(s)", timeout=TIMEOUT_MS)
        expect(page.locator("#layout-overlay img").first).to_be_visible()
        page.wait_for_timeout(2000)
        print(page.locator("#generate-info").inner_text(), flush=True)
        if page.locator(".toast-body.error").count():
            raise RuntimeError("the page shows an error: " + page.locator(".toast-body.error").first.inner_text())
        page.screenshot(path=str(out / "app-screenshot.png"), full_page=True)
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the screenshots go")
    parser.add_argument("--port", type=int, default=7861)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="app-tour-") as folder:
        work = Path(folder)
        process = start_app(work, args.port)
        try:
            tour(f"http://127.0.0.1:{args.port}/", work, args.out)
        finally:
            process.terminate()
            process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
