"""The documents a user reads cite only what the repository holds.

Every file tracked by git is scanned (``git ls-files``): a reference to the design
document that never was in the repository, or to an internal issue number in a
user-facing document, sends a newcomer nowhere.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Spelled in two parts so that this file does not match itself.
MISSING_DOC = "DESIGN" + ".md"
USER_DOCS = ("README.md", "CHANGELOG.md", "docs/", "sql/", "cdc_relay/sql/", "deploy/")


def tracked_text_files() -> dict[str, str]:
    """Path -> text of every tracked file that decodes as UTF-8."""
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, timeout=60
    ).stdout.split(b"\0")
    found = {}
    for raw in names:
        name = raw.decode()
        path = ROOT / name
        if not name or not path.is_file():
            continue
        try:
            found[name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
    return found


def test_no_file_cites_the_missing_design_document() -> None:
    files = tracked_text_files()
    assert "README.md" in files and "cdc_relay/router.py" in files
    citing = sorted(name for name, text in files.items() if MISSING_DOC in text)
    assert citing == [], f"point these at docs/architecture.md: {citing}"


def test_user_facing_documents_cite_no_issue_numbers() -> None:
    pattern = re.compile(r"\bissues? #?\d+\b", re.IGNORECASE)
    hits = [
        f"{name}: {m[0]}"
        for name, text in tracked_text_files().items()
        if name.startswith(USER_DOCS)
        for m in pattern.finditer(text)
    ]
    assert hits == []


def test_the_architecture_document_exists() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert "## The life of a row" in text


def test_the_readme_code_map_names_every_module() -> None:
    """A module by its file name, or a package by its folder (``contrib/django/``)."""
    readme = (ROOT / "README.md").read_text()
    package = ROOT / "cdc_relay"
    missing = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        relative = path.relative_to(package)
        folders = [f"{'/'.join(relative.parts[:n])}/" for n in range(1, len(relative.parts))]
        if path.name not in readme and not any(f"`{f}" in readme for f in folders):
            missing.append(str(relative))
    assert missing == []
