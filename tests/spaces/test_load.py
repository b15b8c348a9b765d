from __future__ import annotations

import pytest

from spaces.load import SpaceError
from spaces.load import load_space
from spaces.yaml_file import MAX_FILE_BYTES
from tests.helpers import alias_bomb


def test_a_space_file_is_read_through_the_bounded_loader(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb() + "params: {}\n")
    with pytest.raises(SpaceError, match=f"^{bomb}: expands to more than 100000 values"):
        load_space(bomb)
    big = tmp_path / "big.yaml"
    big.write_text("#" * (MAX_FILE_BYTES + 1))
    with pytest.raises(
        SpaceError, match=f"^{big}: {MAX_FILE_BYTES + 1} bytes; space files are at most"
    ):
        load_space(big)
