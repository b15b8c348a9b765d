from __future__ import annotations

import time

import pytest

from spaces.errors import ConfigError
from spaces.yaml_file import MAX_FILE_BYTES
from spaces.yaml_file import read_yaml
from spaces.yaml_file import safe_yaml
from tests.helpers import alias_bomb


def test_an_alias_bomb_is_refused_quickly_naming_the_file(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    start = time.monotonic()
    with pytest.raises(ConfigError, match="expands to more than 100000 values") as err:
        read_yaml(path, "space")
    assert str(err.value).startswith(f"{path}: ")
    assert time.monotonic() - start < 10  # expanded, 10**9 values would take hours


def test_an_oversize_file_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("a: [" + "1, " * (MAX_FILE_BYTES // 3) + "1]\n")
    with pytest.raises(ConfigError, match=f"space files are at most {MAX_FILE_BYTES} bytes") as e:
        read_yaml(path, "space")
    assert str(e.value).startswith(f"{path}: ")


def test_tags_that_build_objects_and_non_utf8_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--set x: not valid YAML"):
        safe_yaml("!!python/object/apply:os.system [true]", "--set x")
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"# caf\xe9\na: 1\n")
    with pytest.raises(ConfigError, match=f"{path}: not UTF-8 text"):
        read_yaml(path, "space")


def test_a_plain_document_reads_as_safe_load_would(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("params: {a: &v [1, 2], b: *v}\n")
    assert read_yaml(path, "space") == {"params": {"a": [1, 2], "b": [1, 2]}}
