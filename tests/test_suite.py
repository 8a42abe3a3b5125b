"""The suite's own configuration (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

from conftest import LONGEST_FIRST


def test_the_longest_first_order_names_files_that_exist():
    # A renamed file would drop out of the order silently and start last again.
    here = Path(__file__).parent
    assert [name for name in LONGEST_FIRST if not (here / name).is_file()] == []
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
