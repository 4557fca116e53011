"""Test helpers for graft's HTML pages: their structure (html.parser) and a real browser (Chromium)."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]


@dataclass
class Section:
    id: str
    heading: str = ""
    images: list[str] = field(default_factory=list)  # the src of every <img>
    text: str = ""
    table_rows: int = 0


class _Sections(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, Section] = {}
        self.current: Section | None = None
        self.in_heading = False
        self.resources: list[str] = []  # every src/href, to prove nothing is fetched from elsewhere
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        for key in ("src", "href"):
            if attrs.get(key):
                self.resources.append(attrs[key])
        if tag == "section":
            self.current = self.sections.setdefault(attrs.get("id", ""), Section(attrs.get("id", "")))
        elif tag == "h2" and self.current is not None:
            self.in_heading = True
        elif tag == "img" and self.current is not None:
            self.current.images.append(attrs.get("src", ""))
        elif tag == "tr" and self.current is not None:
            self.current.table_rows += 1

    def handle_endtag(self, tag):
        if tag == "section":
            self.current = None
        elif tag == "h2":
            self.in_heading = False

    def handle_data(self, data):
        if self.current is None:
            return
        if self.in_heading:
            self.current.heading += data
        self.current.text += data


def parse_page(path: Path) -> _Sections:
    parser = _Sections()
    parser.feed(Path(path).read_text(encoding="utf-8"))
    return parser


def decode_png(src: str) -> Image.Image:
    """The embedded PNG of a data URI, decoded (fails the test if it is not a real PNG)."""
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):], validate=True)))
    image.load()
    assert image.format == "PNG" and image.width > 0 and image.height > 0
    return image


def open_in_chromium(path: Path, screenshot: Path | None = None) -> tuple[list[str], list[dict]]:
    """Load a page via file:// in headless Chromium: (console errors, [{src, naturalWidth}] per img)."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(Path(path).resolve().as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => ({src: e.src.slice(0, 40), naturalWidth: e.naturalWidth, complete: e.complete}))"
            )
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return errors, images
