"""The method's document is in the repository (issue 22 item 8): every citation of a METHOD.md section names one
of its headings, and no tracked file points outside the repository for the spec."""

from __future__ import annotations

import re
import subprocess

import pytest
from helpers import REPO

# METHOD.md, a comma, then the section's heading in double quotes (code, configs, Markdown; `\"` inside a
# notebook's JSON); a heading may wrap lines.
CITATION = re.compile(r'METHOD\.md,\s+\\?"([^"\\]+)\\?"')
OUTSIDE = ("../" + "shared", "SAGE_" + "METHOD")  # the old spec's folder and name, spelled apart: not in this file


def _tracked_text() -> dict[str, str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    texts = {}
    for name in filter(None, out.split("\0")):
        path = REPO / name
        if path.is_file() and "/weights/" not in name:
            try:
                texts[name] = path.read_text()
            except UnicodeDecodeError:  # images and other binary files
                continue
    return texts


def _headings() -> set[str]:
    text = (REPO / "METHOD.md").read_text()
    return {m.group(1).strip() for m in re.finditer(r"(?m)^#+\s+(.+)$", text)}


def test_every_cited_section_is_a_heading_of_method_md():
    headings = _headings()
    cited = {
        (name, " ".join(m.group(1).split()))
        for name, text in _tracked_text().items()
        for m in CITATION.finditer(text)
    }
    assert len({section for _, section in cited}) >= 5  # the walk reached the citations (code, configs, README)
    missing = sorted(f"{name}: {section!r}" for name, section in cited if section not in headings)
    assert missing == [], f"cited sections that METHOD.md lacks (headings: {sorted(headings)})"


def test_no_tracked_file_points_outside_the_repository():
    texts = _tracked_text()
    assert "README.md" in texts and "METHOD.md" in texts
    assert sorted(name for name, text in texts.items() if any(o in text for o in OUTSIDE)) == []
