"""The pieces the report pages are made of: the inline style, small HTML helpers, thumbnail tiles.

Shared by report.html (`graft.report.html`, its multi-label sections in `graft.report.multilabel`)
and compare.html (`graft.report.compare`).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Iterable, Sequence

from graft.errors import ImageError
from graft.input.images import load_image

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 1.5rem; color: #1d2327; line-height: 1.45; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 2px solid #e3e6e8; padding-bottom: .2rem; margin-top: 2rem; }
.lead { color: #50575e; margin-top: 0; }
.cards { display: flex; flex-wrap: wrap; gap: .8rem; margin: 1rem 0; }
.card { background: #f4f6f7; border-radius: 8px; padding: .6rem 1rem; min-width: 9rem; }
.card b { display: block; font-size: 1.35rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .9rem; }
th, td { border-bottom: 1px solid #e3e6e8; padding: .25rem .7rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f6f7; }
img { max-width: 100%; height: auto; }
figure { margin: .6rem 0; }
figcaption, .note { color: #50575e; font-size: .85rem; }
.gallery { display: flex; flex-wrap: wrap; gap: .8rem; }
.gallery figure { width: 120px; margin: 0; text-align: center; }
.gallery img { width: 112px; height: 112px; image-rendering: pixelated; border: 1px solid #ccd0d4; }
.bad { color: #b32d2e; }
"""


def esc(value: object) -> str:
    """`value` as text safe inside HTML, attributes included."""
    return html.escape(str(value), quote=True)


def page(title: str, body: str) -> str:
    """A complete HTML document with the report's inline style and no external resources."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def section(section_id: str, heading: str, content: str) -> str:
    """A `<section>` with its `id` (the page's anchors) and an `<h2>` heading."""
    return f'<section id="{esc(section_id)}">\n<h2>{esc(heading)}</h2>\n{content}\n</section>\n'


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain table; every cell escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def img(uri: str, alt: str, caption: str | None = None) -> str:
    """A figure from a data URI, with an optional caption."""
    tag = f'<img src="{uri}" alt="{esc(alt)}">'
    return f"<figure>{tag}<figcaption>{esc(caption)}</figcaption></figure>" if caption else f"<figure>{tag}</figure>"


def note(text: str) -> str:
    """A grey paragraph of explanation."""
    return f'<p class="note">{esc(text)}</p>'


def fmt(value: Any, digits: int = 3) -> str:
    """A number as the report shows it: floats to `digits` decimals, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def scope_note(averaged: int, total: int, noun: str) -> str:
    """` (over 2 of 3 classes)` when an average covers fewer than all `total`; else nothing."""
    return "" if averaged == total else f" (over {averaged} of {total} {noun})"


def thumbnail(path: Path, alt: str, caption: str, figures: Any, side: int = 160) -> str | None:
    """A gallery tile: the image at `path` decoded and shrunk to `side` pixels on its longer side,
    with `caption` (HTML) under it; None when the file cannot be read (moved or removed since)."""
    try:
        uri = figures.image_uri(load_image(path, min_size=side), max_side=side)
    except ImageError:
        return None
    return f'<figure><img src="{uri}" alt="{esc(alt)}"><figcaption>{caption}</figcaption></figure>'


def gallery(tiles: Iterable[str | None]) -> str:
    """Tiles side by side, wrapping (the tiles that could not be read left out)."""
    return f'<div class="gallery">{"".join(t for t in tiles if t)}</div>'
