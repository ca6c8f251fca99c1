import hashlib
from pathlib import Path

import pytest

import charlm.corpus as corpus_module
from charlm.corpus import cache_dir, read_text, registry, resolve_corpus
from charlm.errors import ConfigError, CorpusError

LINES = "".join(f"line {i} of the corpus\n" for i in range(100))


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- reading ------------------------------------------------------------------------------------

def test_read_text_returns_exact_utf8_text(tmp_path):
    text = "naïve café\r\nline two 😀\n"
    assert read_text(write(tmp_path / "c.txt", text)) == text


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"abc\x00def", r"binary \(NUL byte at offset 3\)"),
    (b"ok \xff\xfe bad", r"not UTF-8 \(byte 0xff at offset 3\)"),
])
def test_unusable_files_are_one_line_corpus_errors(tmp_path, content, message):
    path = write(tmp_path / "c.txt", content)
    with pytest.raises(CorpusError, match=message) as info:
        read_text(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    with pytest.raises(CorpusError, match=message):
        resolve_corpus(path)


def test_invalid_utf8_can_be_replaced(tmp_path):
    path = write(tmp_path / "c.txt", b"ok \xff bad\n" * 20)
    assert read_text(path, errors="replace").startswith("ok \ufffd bad\n")
    splits = resolve_corpus(path, errors="replace")
    assert "\ufffd" in splits.train.read_text() and "\ufffd" in splits.valid.read_text()


def test_missing_paths_and_unknown_names(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        read_text(tmp_path / "absent.txt")
    with pytest.raises(CorpusError, match="not found"):
        resolve_corpus(str(tmp_path / "absent.txt"))
    with pytest.raises(CorpusError, match=r"unknown corpus 'shakespear'; known corpora: .*tinyshakespeare"):
        resolve_corpus("shakespear")


# --- splits -------------------------------------------------------------------------------------

def test_single_file_splits_off_a_contiguous_tail_at_a_line_break(tmp_path):
    path = write(tmp_path / "lines.txt", LINES)
    splits = resolve_corpus(path)
    assert splits.name == "lines" and splits.test is None
    train, valid = splits.train.read_text(), splits.valid.read_text()
    assert train + valid == LINES
    assert train.endswith("\n") and valid.startswith("line 91 ")  # the cut falls inside line 90
    assert abs(len(valid) / len(LINES) - 0.1) < 0.02
    wider = resolve_corpus(path, valid_fraction=0.25)
    assert wider.valid.size > splits.valid.size and wider.checksum != splits.checksum
    assert resolve_corpus(path).checksum == splits.checksum


def test_a_file_without_line_breaks_is_split_by_characters(tmp_path):
    splits = resolve_corpus(write(tmp_path / "one.txt", "x" * 1000))
    assert (splits.train.size, splits.valid.size) == (900, 100)


def test_too_short_file_and_bad_fraction(tmp_path):
    with pytest.raises(CorpusError, match="too short"):
        resolve_corpus(write(tmp_path / "tiny.txt", "a"), valid_fraction=0.1)
    with pytest.raises(ConfigError, match="valid_fraction"):
        resolve_corpus(write(tmp_path / "ok.txt", LINES), valid_fraction=1.5)


def test_folder_with_split_files(tmp_path):
    folder = tmp_path / "mycorpus"
    write(folder / "train.txt", "train text\n")
    write(folder / "valid.txt", "valid text\n")
    splits = resolve_corpus(folder)
    assert (splits.name, splits.train.read_text(), splits.valid.read_text(), splits.test) == (
        "mycorpus", "train text\n", "valid text\n", None)
    write(folder / "test.txt", "test text\n")
    with_test = resolve_corpus(folder)
    assert with_test.test.read_text() == "test text\n" and with_test.checksum != splits.checksum
    assert with_test.cache_key("train") != with_test.cache_key("valid")


def test_folder_without_valid_splits_its_train_file(tmp_path):
    write(tmp_path / "c" / "train.txt", LINES)
    splits = resolve_corpus(tmp_path / "c")
    assert splits.train.read_text() + splits.valid.read_text() == LINES


def test_folder_without_train_is_an_error(tmp_path):
    write(tmp_path / "c" / "valid.txt", LINES)
    with pytest.raises(CorpusError, match="no train.txt"):
        resolve_corpus(tmp_path / "c")


# --- registered corpora -------------------------------------------------------------------------

@pytest.fixture
def fake_registry(monkeypatch, tmp_path):
    """A registered corpus 'toy' whose original lives at a file:// URL."""
    origin = write(tmp_path / "origin" / "toy.txt", LINES)
    entry = {
        "files": {"input.txt": {"bytes": len(LINES), "sha256": sha256(LINES.encode()), "url": origin.as_uri()}},
        "split": {"train": "input.txt", "valid_fraction": 0.2},
        "licence": "test data",
    }
    monkeypatch.setattr(corpus_module, "registry", lambda: {"toy": entry})
    monkeypatch.delenv("CHARLM_CORPORA", raising=False)
    return entry


def test_registered_corpus_is_found_in_charlm_corpora_first(monkeypatch, tmp_path, fake_registry):
    write(tmp_path / "shared" / "toy" / "input.txt", LINES)
    monkeypatch.setenv("CHARLM_CORPORA", str(tmp_path / "shared"))
    splits = resolve_corpus("toy")
    assert splits.name == "toy" and splits.train.read_text() + splits.valid.read_text() == LINES
    assert abs(splits.valid.size / len(LINES) - 0.2) < 0.02
    assert not (cache_dir() / "corpora").exists()


def test_missing_registered_file_is_downloaded_into_the_cache_and_verified(tmp_path, fake_registry):
    splits = resolve_corpus("toy")
    downloaded = cache_dir() / "corpora" / "toy" / "input.txt"
    assert downloaded.read_text() == LINES and splits.train.read_text() + splits.valid.read_text() == LINES
    assert [p.name for p in downloaded.parent.iterdir()] == ["input.txt"]
    (tmp_path / "origin" / "toy.txt").unlink()
    assert resolve_corpus("toy").checksum == splits.checksum  # now served from the cache


def test_download_with_wrong_checksum_leaves_nothing_behind(fake_registry):
    fake_registry["files"]["input.txt"]["sha256"] = "0" * 64
    with pytest.raises(CorpusError, match="expected 000000000000"):
        resolve_corpus("toy")
    assert list((cache_dir() / "corpora" / "toy").iterdir()) == []


def test_unreachable_download_says_where_to_put_the_file(fake_registry):
    fake_registry["files"]["input.txt"]["url"] = "file:///nonexistent/toy.txt"
    with pytest.raises(CorpusError, match=r"toy/input.txt is missing and could not be downloaded .*put it at "):
        resolve_corpus("toy")


def test_registered_file_that_does_not_match_its_checksum_is_refused(monkeypatch, tmp_path, fake_registry):
    write(tmp_path / "shared" / "toy" / "input.txt", LINES.replace("line 7", "line 8"))
    monkeypatch.setenv("CHARLM_CORPORA", str(tmp_path / "shared"))
    with pytest.raises(CorpusError, match="does not match the registered toy/input.txt"):
        resolve_corpus("toy")


def test_cache_dir_follows_charlm_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CHARLM_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("CHARLM_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "charlm"


def test_registry_entries_are_complete():
    names = {"tinyshakespeare", "ptb", "ptb_char", "wikitext-2", "enwik8_small"}
    assert names <= set(registry())
    for name, entry in registry().items():
        assert entry["licence"] and entry["split"]["train"] in entry["files"], name
        for spec in entry["files"].values():
            assert len(spec["sha256"]) == 64 and spec["bytes"] > 0
            assert spec["url"].startswith("https://raw.githubusercontent.com/")


def test_shared_corpora_match_the_registry(corpora_dir):
    for name, entry in registry().items():
        for filename, spec in entry["files"].items():
            path = corpora_dir / name / filename
            assert path.stat().st_size == spec["bytes"], path
        splits = resolve_corpus(name)  # checks every sha256
        assert splits.train.size and splits.valid.size
    ptb = resolve_corpus("ptb")
    assert ptb.test is not None and ptb.train.read_text().count("\n") == 42_068
    shakespeare = resolve_corpus("tinyshakespeare")
    assert shakespeare.train.read_text().startswith("First Citizen:") and shakespeare.test is None


# --- streaming ----------------------------------------------------------------------------------

def old_tail_split(text: str, valid_fraction: float) -> tuple[str, str]:
    """The split rule on characters of the whole text, as it was before corpora were streamed."""
    cut = int(len(text) * (1.0 - valid_fraction))
    newline = text.find("\n", max(cut - 1, 0))
    if 0 <= newline < len(text) - 1:
        cut = newline + 1
    return text[:cut], text[cut:]


@pytest.mark.parametrize("line", ["plain ascii line\n", "naïve café — 東京 😀 line\n", "no newline at all é "])
def test_the_tail_is_found_by_seeking_and_matches_the_character_rule(tmp_path, monkeypatch, line):
    monkeypatch.setattr(corpus_module, "SCAN_BLOCK_BYTES", 1000)  # many blocks, sequences cut between them
    text = "".join(f"{i} {line}" for i in range(2000))
    splits = resolve_corpus(write(tmp_path / "c.txt", text), valid_fraction=0.137)
    assert (splits.train.read_text(), splits.valid.read_text()) == old_tail_split(text, 0.137)


def test_bad_bytes_deep_in_a_big_file_are_named_by_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "SCAN_BLOCK_BYTES", 1 << 16)
    body = ("a line of text with é and 😀\n" * 40_000).encode()  # about 1.3 MB, 20 blocks
    for data, message in [
        (body[:700_001] + b"\xe9" + body[700_001:], r"not UTF-8 \(byte 0xe9 at offset 700001\)"),
        (body[:1_200_000] + b"\x00" + body[1_200_000:], r"binary \(NUL byte at offset 1200000\)"),
        (body + b"\xf0\x9f", rf"not UTF-8 \(byte 0xf0 at offset {len(body)}\)"),  # cut short at the end
    ]:
        path = write(tmp_path / "big.txt", data)
        with pytest.raises(CorpusError, match=message) as info:
            resolve_corpus(path)
        assert "\n" not in str(info.value)


def test_a_utf8_error_is_found_where_a_block_boundary_cuts_a_sequence(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "SCAN_BLOCK_BYTES", 8)
    data = "abcdefg😀".encode() + b"\x80ok\n"  # the emoji straddles the first block's end
    with pytest.raises(CorpusError, match=r"byte 0x80 at offset 11\)"):
        resolve_corpus(write(tmp_path / "c.txt", data))


def test_checksum_is_the_sha256_of_the_bytes(tmp_path):
    data = LINES.encode()
    splits = resolve_corpus(write(tmp_path / "c.txt", data), valid_fraction=0.5)
    assert splits.checksum == corpus_module._combine(sha256(data), "valid_fraction=0.5")


def test_chunks_cover_the_span_and_end_where_no_token_straddles(tmp_path):
    text = "".join(f" = heading {i} = \n\n line {i} of text, café\n" for i in range(3000))
    splits = resolve_corpus(write(tmp_path / "c.txt", text))
    span = splits.train
    ranges = span.byte_ranges(4096)
    assert ranges[0][0] == span.start and ranges[-1][1] == span.end and len(ranges) > 20
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    pieces = list(span.chunks(ranges))
    assert "".join(pieces) == span.read_text()
    for piece in pieces[1:]:
        assert piece[0] == " " and piece[1].isalnum()  # after "\n", before " word"
    assert all(piece.endswith("\n") for piece in pieces)


def test_a_line_longer_than_a_chunk_is_cut_at_a_space_then_at_a_character(tmp_path):
    text = "é" * 5000 + " " + "ü" * 5000
    span = corpus_module.TextSpan(write(tmp_path / "c.txt", text), 0, len(text.encode()))
    pieces = list(span.chunks(span.byte_ranges(2000)))
    assert "".join(pieces) == text and len(pieces) > 3  # every cut on a character boundary, one at the space


def test_sample_ranges_are_evenly_spaced_line_aligned_and_reproducible(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "SAMPLE_BLOCK_BYTES", 1000)
    text = "".join(f"line {i}\n" for i in range(20_000))
    span = resolve_corpus(write(tmp_path / "c.txt", text)).train
    ranges = span.sample_ranges(10_000)
    assert ranges == span.sample_ranges(10_000) and len(ranges) == 10
    assert ranges[-1][0] > span.size * 0.8 and sum(b - a for a, b in ranges) < 12_000
    assert all(piece.startswith("line") and piece.endswith("\n") for piece in span.chunks(ranges))
    assert span.sample_ranges(span.size) == span.byte_ranges()
