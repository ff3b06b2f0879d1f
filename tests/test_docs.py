"""The pages a user reads point at things that exist: every relative link (and its #anchor), every
`setup_scripts/...` file and every `nnunet_kd <command>` named in README.md, BENCHMARKS.md and docs/."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from nnunet_kd.tools.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(REPO).as_posix() for p in PAGES])
def test_relative_links_and_anchors_exist(page):
    broken = []
    for target in LINK.findall(re.sub(r"```.*?```", "", page.read_text(), flags=re.S)):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading with that anchor in {resolved.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(REPO).as_posix() for p in PAGES])
def test_named_scripts_and_commands_exist(page):
    text = page.read_text()
    scripts = set(re.findall(r"setup_scripts/[\w./-]*\w\.sh", text))
    missing = sorted(s for s in scripts if not (REPO / s).is_file())
    _, subcommands = build_parser()
    commands = set(re.findall(r"nnunet_kd ([a-z][a-z0-9-]*)", text))
    unknown = sorted(c for c in commands if c not in subcommands.choices)
    assert not missing and not unknown, f"{page.name}: missing scripts {missing}, unknown commands {unknown}"


def test_readme_is_the_short_entrance():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250
