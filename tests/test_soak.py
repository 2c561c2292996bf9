"""The soak run (tests/soak.py) under pytest: `python -m pytest -m soak -s` (about 15 min)."""
import pytest

import soak


@pytest.mark.soak
def test_soak_ten_kills_five_terms_bit_identical(tmp_path):
  assert soak.main([f"--workdir={tmp_path}", "--kills=10", "--terms=5"]) == 0
