"""The Markdown documents (the README, the log, docs/) cite only results files the repository holds (a `*` in a
cited name must match one)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"`(results/[^`\s]+)`")


def test_every_cited_results_file_is_in_the_repo():
    cited = {(doc.name, m.group(1).rstrip(".,)")) for doc in [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md")]
             for m in CITED.finditer(doc.read_text())}
    # a file has a suffix (folders, such as those the figures command fills, and <templates> name none)
    files = {(doc, c) for doc, c in cited if "<" not in c and Path(c).suffix}
    missing = sorted((doc, c) for doc, c in files if not list(ROOT.glob(c)))
    assert len(files) > 20 and not missing, missing
