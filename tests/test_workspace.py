"""WORKSPACE.md cites only results files the repository holds (a `*` in a cited name must match one)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"`(results/[^`\s]+)`")


def test_every_cited_results_file_is_in_the_repo():
    cited = {m.group(1).rstrip(".,)") for m in CITED.finditer((ROOT / "WORKSPACE.md").read_text())}
    files = {c for c in cited if "<" not in c and not c.endswith("/")}  # templates and folders name no file
    missing = sorted(c for c in files if not list(ROOT.glob(c)))
    assert len(files) > 20 and not missing, missing
