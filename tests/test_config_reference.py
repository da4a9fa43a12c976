from pathlib import Path

from opd.config import reference_markdown


def test_readme_config_reference_is_current():
    table = reference_markdown().split("\n", 3)[3]
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert table in readme, "README config reference is stale: run `make docs`"
