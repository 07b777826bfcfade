"""The web page shows what the classifier sees and switches guidance (headless Debian chromium)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from service.app import create_app

from test_service_browser import CHROMIUM, CHROMIUM_ARGS, screenshot_path

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install -y chromium)"),
]


@pytest.fixture(scope="module")
def server_224(tmp_path_factory: pytest.TempPathFactory):
    from conftest import build_tiny_checkpoint, live_app_server

    ckpt = build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny224", image_size=224)
    config = json.loads((ckpt / "config.json").read_text())
    config["inference"]["concept_weight"] = None  # place the concept whatever it costs the untrained decoder
    (ckpt / "config.json").write_text(json.dumps(config))
    app = create_app({"CAPTIONER_MODEL": str(ckpt), "CAPTIONER_LOAD_IN_BACKGROUND": False})
    with live_app_server(app) as url:
        yield url


def test_page_shows_concepts_and_guidance_menu(server_224: str, tmp_path: Path) -> None:
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright
    from skimage import data

    photo = tmp_path / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(photo, quality=90)  # a tabby cat
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 880})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server_224 + "/")
        page.set_input_files("#file-input", str(photo))
        concepts = page.locator("#concepts li")
        expect(concepts.first).to_be_visible(timeout=60_000)
        expect(concepts.first).to_contain_text("cat")
        expect(concepts.first.locator(".score")).to_have_text(re.compile(r"^\d+%$"))
        words = [w.strip() for w in page.locator("#caption .word").all_inner_texts()]
        assert words.count("cat") == 1  # guided by default: the untrained tiny decoder would not say it
        page.screenshot(path=str(screenshot_path(tmp_path, "service-concepts.png")), full_page=True)

        page.select_option("#guidance", "none")  # the plain model
        with page.expect_response(lambda r: r.url.endswith("/v1/captions")) as response:
            page.click("#recaption")
        assert response.value.json()["parameters"]["guidance"] == "none"
        expect(concepts.first).to_contain_text("cat")  # still reported
        browser.close()
    assert not errors
