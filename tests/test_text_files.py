"""The one text reader (neuraldb.text_files): gzip told by content, BOM dropped, bad bytes placed at their line."""

from __future__ import annotations

import gzip

import pytest
from neuraldb.calibration import read_corpus
from neuraldb.text_files import TextFileError, read_text


def test_gzip_is_told_by_its_magic_bytes_not_the_name(tmp_path):
    (tmp_path / "plain.gz").write_text("not compressed\n", encoding="utf-8")
    (tmp_path / "packed.txt").write_bytes(gzip.compress("\ufeffcompressed é\n".encode()))
    assert read_text(tmp_path / "plain.gz") == "not compressed\n"
    assert read_text(tmp_path / "packed.txt") == "compressed é\n"


def test_bad_bytes_and_broken_gzip_name_the_file_and_line(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"one\ntwo\nthr\xe9e\n")
    with pytest.raises(TextFileError, match=r"latin1\.txt: line 3: not UTF-8 text \(byte 0xe9"):
        read_text(tmp_path / "latin1.txt")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(b"x" * 1000)[:20])
    with pytest.raises(TextFileError, match=r"cut\.gz: not a readable gzip file"):
        read_text(tmp_path / "cut.gz")


def test_the_calibration_corpus_reader_is_this_reader(tmp_path):
    (tmp_path / "c.txt").write_bytes(gzip.compress(b"some text"))
    assert read_corpus(tmp_path / "c.txt") == "some text"
    (tmp_path / "blank.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no text"):
        read_corpus(tmp_path / "blank.txt")
