"""The web page in a real headless browser (Debian chromium driven by playwright).

Skipped only where chromium is not installed (`apt-get install -y chromium`);
playwright's own browser download is never used. Set SERVICE_SCREENSHOT_DIR to
keep the screenshots.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import pytest

from service.app import create_app

from conftest import image_bytes, live_app_server, make_image

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install -y chromium)"),
]

HEAT_ALPHA_JS = """() => {
  const c = document.getElementById('heatmap');
  if (!c.width || !c.height) return 0;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let s = 0;
  for (let i = 3; i < d.length; i += 4) s += d[i];
  return s / (d.length / 4);
}"""

DROP_JS = """([b64, name, type]) => {
  const bin = atob(b64), bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, {type}));
  const zone = document.getElementById('dropzone');
  zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true}));
  zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
}"""


@pytest.fixture(scope="module")
def live_server(tiny_checkpoint):
    app = create_app({"CAPTIONER_MODEL": str(tiny_checkpoint), "CAPTIONER_LOAD_IN_BACKGROUND": False})
    with live_app_server(app) as url:
        yield url


@pytest.fixture
def browser_page(live_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 880})
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("console", lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)
        page.on(
            "request",
            lambda req: (
                None
                if req.url.startswith((live_server, "blob:", "data:"))
                else problems.append(f"external request: {req.url}")
            ),
        )
        yield page, problems
        browser.close()


def screenshot_path(tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("SERVICE_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def test_upload_caption_and_word_heat_map(browser_page, live_server, tmp_path):
    from playwright.sync_api import expect

    page, problems = browser_page
    photo = tmp_path / "photo.jpg"
    make_image(3, (640, 480)).save(photo, quality=90)

    page.goto(live_server + "/")
    expect(page.locator("#model-status")).to_have_class(re.compile("status-ready"), timeout=30_000)
    expect(page.locator("#model-status")).to_have_text("tiny-test 0.0")
    page.set_input_files("#file-input", str(photo))

    words = page.locator("#caption .word")
    expect(words.first).to_be_visible(timeout=60_000)
    expect(page.locator("#busy")).to_be_hidden()
    caption = page.locator("#caption").inner_text().strip()
    assert caption and caption.split() == [w.strip() for w in words.all_inner_texts()]
    expect(page.locator("#file-name")).to_have_text("photo.jpg")
    expect(page.locator("#alternatives li")).to_have_count(2)  # default: 2 alternatives
    expect(page.locator("#timing dt")).to_have_count(6)
    assert page.evaluate(HEAT_ALPHA_JS) == 0  # nothing drawn until a word is chosen

    # The canvas lies exactly over the displayed image.
    img_box, canvas_box = page.locator("#photo").bounding_box(), page.locator("#heatmap").bounding_box()
    for key in ("x", "y", "width", "height"):
        assert abs(img_box[key] - canvas_box[key]) <= 1, (img_box, canvas_box)

    # Clicking a word pins it and draws its attention over the image.
    words.first.click()
    expect(words.first).to_have_class(re.compile(r"\bactive\b"))
    assert page.evaluate(HEAT_ALPHA_JS) > 40
    assert page.locator("#heatmap").get_attribute("data-word") == "0"
    expect(page.locator("#word-detail")).to_contain_text("strongest attention")
    page.screenshot(path=str(screenshot_path(tmp_path, "service-caption.png")), full_page=True)

    # Hovering another word shows that word; leaving it returns to the pinned one.
    if words.count() > 1:
        words.nth(1).hover()
        assert page.locator("#heatmap").get_attribute("data-word") == "1"
        page.mouse.move(5, 5)
        assert page.locator("#heatmap").get_attribute("data-word") == "0"
    # Clicking the pinned word again unpins it.
    words.first.click()
    page.mouse.move(5, 5)
    assert page.evaluate(HEAT_ALPHA_JS) == 0
    assert problems == []


def test_drag_and_drop_options_and_errors(browser_page, live_server, tmp_path):
    from playwright.sync_api import expect

    page, problems = browser_page
    page.goto(live_server + "/")
    expect(page.locator("#model-status")).to_have_class(re.compile("status-ready"), timeout=30_000)

    png = base64.b64encode(image_bytes(make_image(5, (300, 400)), "PNG")).decode()
    page.evaluate(DROP_JS, [png, "dropped.png", "image/png"])
    expect(page.locator("#caption .word").first).to_be_visible(timeout=60_000)
    expect(page.locator("#file-name")).to_have_text("dropped.png")
    expect(page.locator("#meta")).to_contain_text("300×400")

    # Changing an option captions the same image again with it.
    page.select_option("#n-best", "1")
    expect(page.locator("#alternatives-block")).to_be_hidden(timeout=60_000)
    expect(page.locator("#meta")).to_contain_text("beam 3")
    page.select_option("#beam-size", "1")
    expect(page.locator("#meta")).to_contain_text("beam 1", timeout=60_000)

    # A file that is not an image: the server's JSON error is shown, nothing breaks.
    page.evaluate(DROP_JS, [base64.b64encode(b"hello").decode(), "notes.txt", "text/plain"])
    expect(page.locator("#error")).to_be_visible(timeout=60_000)
    expect(page.locator("#error")).to_contain_text("unsupported_media_type")
    page.evaluate(DROP_JS, [base64.b64encode(b"\x89PNG broken").decode(), "broken.png", "image/png"])
    expect(page.locator("#error")).to_contain_text("undecodable", timeout=60_000)
    page.screenshot(path=str(screenshot_path(tmp_path, "service-error.png")), full_page=True)
    assert [p for p in problems if "status of 4" not in p] == []  # the 4xx answers themselves are expected


def test_docs_page_renders_offline(browser_page, live_server, tmp_path):
    from playwright.sync_api import expect

    page, problems = browser_page
    page.goto(live_server + "/docs")
    expect(page.locator("article.operation")).to_have_count(7)
    expect(page.locator("#createCaption")).to_contain_text("/v1/captions")
    expect(page.locator("#model-status")).to_have_text("tiny-test 0.0")
    page.screenshot(path=str(screenshot_path(tmp_path, "service-docs.png")))
    assert problems == []
