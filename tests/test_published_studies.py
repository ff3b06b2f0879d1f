"""Every study BENCHMARKS.md reports is published as its plan and per-case Dice (`benchmarks/results/<study>/`): its
tables are recomputed from those files and must be what BENCHMARKS.md shows, between `<!-- study: FOLDER -->` and
`<!-- /study -->`."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from nnunet_kd.tools.study_report import TABLES_FILE, study_tables

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = sorted(p.parent for p in (REPO / "benchmarks" / "results").glob("*/study.json"))
BLOCK = re.compile(r"<!-- study: (\S+) -->\n(.*?)<!-- /study -->", re.S)


def test_benchmarks_quote_published_studies_only():
    quoted = {REPO / folder for folder, _ in BLOCK.findall((REPO / "BENCHMARKS.md").read_text())}
    assert quoted, "BENCHMARKS.md quotes no published study table"
    assert quoted <= set(PUBLISHED), f"quoted but not published: {sorted(map(str, quoted - set(PUBLISHED)))}"
    assert set(PUBLISHED) <= quoted, f"published but not quoted: {sorted(map(str, set(PUBLISHED) - quoted))}"


@pytest.mark.parametrize("study", PUBLISHED, ids=[p.name for p in PUBLISHED])
def test_published_tables_are_what_the_per_case_dice_give(study):
    tables = study_tables(study)
    assert (study / TABLES_FILE).read_text() == tables
    blocks = {REPO / folder: text for folder, text in BLOCK.findall((REPO / "BENCHMARKS.md").read_text())}
    assert blocks[study].strip() == tables.strip(), f"BENCHMARKS.md's table of {study.name} is not what its files give"
