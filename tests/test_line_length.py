"""The Python sources keep the line length pyproject.toml declares for the project (`[tool.ruff] line-length`)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_python_sources_keep_the_declared_line_length():
    limit = int(re.search(r"^line-length = (\d+)$", (ROOT / "pyproject.toml").read_text(), re.M).group(1))
    sources = [p for d in ("dwdp_jax", "models", "experiments", "configs", "tests") for p in (ROOT / d).rglob("*.py")]
    long = [f"{p.relative_to(ROOT)}:{i}" for p in sources
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > limit]
    assert len(sources) > 100 and not long, long
