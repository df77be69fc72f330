"""The result tables of the README and the docs are the renderings of the committed raw results."""

import pytest

from benchmarks import tables


@pytest.mark.parametrize("document", tables.DOCUMENTS)
def test_every_marked_table_matches_its_raw_results(document):
    text = (tables.ROOT / document).read_text()
    assert "<!-- table: " in text
    assert tables.render(text) == text, f"run python -m benchmarks.tables to refresh {document}"


def test_a_changed_table_is_detected():
    text = "a\n<!-- table: pass-cost -->\n| stale |\n<!-- /table -->\nb\n"
    rendered = tables.render(text)
    assert "| stale |" not in rendered and "| filet |" in rendered and rendered.endswith("<!-- /table -->\nb\n")
    assert tables.render(rendered) == rendered
