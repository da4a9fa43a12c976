"""Rewrite the config reference at the end of README.md from src/opd/config.py (`make docs`)."""

from pathlib import Path

from opd.config import reference_markdown

readme = Path(__file__).parents[1] / "README.md"
text = readme.read_text()
start = text.index("| key | type | default | meaning |")
# lstrip: the table's own leading newline would otherwise add one more blank line on every run
readme.write_text(text[:start] + reference_markdown().split("\n", 3)[3].lstrip("\n"))
