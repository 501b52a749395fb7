"""Links between the README and docs/ resolve: every relative link names a file that exists, and
every #anchor a heading of that file (GitHub's slugs)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s#]*)(?:#([^)\s]+))?\)")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation but '-' and '_' dropped,
    spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # '#' lines in code are not headings
    return {github_slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_github_slug_drops_punctuation_and_keeps_hyphens():
    assert github_slug("The loop (`jaxem/train/loop.py`) and the trainer") == "the-loop-jaxemtrainlooppy-and-the-trainer"
    assert github_slug("Where it stops: 5 labelled slices (2026-12-06, session 19)") == \
        "where-it-stops-5-labelled-slices-2026-12-06-session-19"


def test_relative_links_and_anchors_of_the_readme_and_docs_resolve():
    broken = []
    for page in PAGES:
        for target, anchor in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path = (page.parent / target).resolve() if target else page
            if not path.exists():
                broken.append(f"{page.name}: {target} does not exist")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{page.name}: {target or page.name}#{anchor} names no heading")
    assert not broken, "\n".join(broken)
