"""The user-facing text: docs/, README.md and the source's docstrings and comments.

They say what graft does and how to use it; the history of its development belongs in git log.
And every relative link in README.md and docs/ leads somewhere.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = sorted((ROOT / "src").rglob("*.py"))

ORDINALS = (
    r"first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|\w+teenth|\w+tieth"
    r"|\w+-(?:first|second|third|\w+th)|\d+(?:st|nd|rd|th)"
)
# "the fifteenth session", "sessions 6 to 16", "this session's CPU", "the earlier sessions' machine".
# The word in its technical senses (onnxruntime's InferenceSession, requests.Session, a variable
# named session, a pytest session) does not match.
DEVELOPMENT_SESSION = re.compile(
    rf"\bsessions?\s+\d+"
    rf"|\b(?:{ORDINALS}|earlier|later|this|that|next|previous|last|one|each|every|another|past)\s+sessions?\b"
    r"|\bsession's|\bsessions'",
    re.IGNORECASE,
)


def test_session_pattern_finds_development_history() -> None:
    for text in ("measured in the fifteenth session", "the trim threshold at 1 GB (sessions 6 to 16)",
                 "bf16 or fp32 on this session's CPU", "on the earlier sessions' 2-core machine",
                 "the 16th session", "the twenty-first session", "as the first session found"):
        assert DEVELOPMENT_SESSION.search(text), text


def test_session_pattern_leaves_technical_sessions_alone() -> None:
    for text in ("session = onnxruntime.InferenceSession(proto, providers=providers)",
                 "InferenceSession(...).get_modelmeta().custom_metadata_map", "with requests.Session() as http:",
                 "max_diff = _max_logit_difference(bundle, session, batch)", "a pytest fixture with scope='session'",
                 "an HTTP session with its cookies", "got = session.run([OUTPUT_NAME], feeds)"):
        assert not DEVELOPMENT_SESSION.search(text), text


@pytest.mark.parametrize("path", MARKDOWN + SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_development_history(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for number, line in enumerate(lines, 1) if DEVELOPMENT_SESSION.search(line)]
    assert not found, "say what graft does, not when it was built (git log keeps the history):\n" + "\n".join(found)


FENCED = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    return INLINE_CODE.sub("", FENCED.sub("", text))


def _anchors(markdown: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    anchors = set()
    for title in HEADING.findall(FENCED.sub("", markdown.read_text(encoding="utf-8"))):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _broken_links(markdown: Path) -> list[str]:
    broken = []
    for target in LINK.findall(_prose(markdown.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        linked = (markdown.parent / path_part).resolve() if path_part else markdown
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor.lower() not in _anchors(linked):
            broken.append(f"{target}: {linked.name} has no heading with that anchor")
    return broken


def test_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## Two words\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#two-words) [gone](missing.md) [no heading](other.md#nowhere)\n"
                    "`[in code](missing.md)` [web](https://example.org/x)\n```\n[fenced](missing.md)\n```\n")
    assert _broken_links(page) == ["missing.md: no such file", "other.md#nowhere: other.md has no heading with that anchor"]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_existing_files_and_headings(path: Path) -> None:
    assert not _broken_links(path), f"{path.relative_to(ROOT)}: broken links: {_broken_links(path)}"
