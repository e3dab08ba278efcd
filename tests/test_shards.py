"""The challenge shard format: round trip, memmap dtype, and each kind of corrupt file."""
from pathlib import Path

import numpy as np
import pytest

from data.shards import (BOS_ID, HEADER_BYTES, MAGIC, ShardError, load_shard, load_stream, read_header,
                         shard_paths, split_documents, write_shard)
from data.writer import ShardWriter

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_round_trip(tmp_path):
    values = np.array([1, 5, 65535, 0, 1, 7], dtype=np.int64)
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, values)
    assert path.stat().st_size == HEADER_BYTES + 2 * values.size
    assert read_header(path) == values.size
    loaded = load_shard(path)
    assert isinstance(loaded, np.memmap) and loaded.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(loaded, values)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [MAGIC, 1, values.size] and not header[3:].any()


def test_empty_shard(tmp_path):
    write_shard(tmp_path / "e.bin", np.zeros(0, np.uint16))
    assert load_shard(tmp_path / "e.bin").size == 0


def test_write_rejects_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "x.bin", np.array([70000]))
    with pytest.raises(ValueError, match="1-D"):
        write_shard(tmp_path / "x.bin", np.zeros((2, 2)))


def _corrupt(tmp_path, header_patch=None, extra=b"", cut=0):
    path = tmp_path / "bad.bin"
    write_shard(path, np.arange(10))
    data = bytearray(path.read_bytes())
    if header_patch:
        word, value = header_patch
        data[4 * word:4 * word + 4] = np.int32(value).tobytes()
    data = bytes(data[:len(data) - cut]) + extra
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kwargs, expected", [
    (dict(header_patch=(0, 12345)), "magic 12345, expected 20240520"),
    (dict(header_patch=(1, 2)), "version 2, expected 1"),
    (dict(cut=3), "must be 1044 bytes, but it is 1041 (truncated)"),
    (dict(extra=b"\0\0"), "must be 1044 bytes, but it is 1046"),
    (dict(header_patch=(2, 11)), "header says 11 tokens, so the file must be 1046 bytes"),
])
def test_corrupt_files(tmp_path, kwargs, expected):
    path = _corrupt(tmp_path, **kwargs)
    for reader in (read_header, load_shard):
        with pytest.raises(ShardError) as e:
            reader(path)
        assert str(path) in str(e.value) and expected in str(e.value)


def test_shorter_than_header(tmp_path):
    path = tmp_path / "tiny.bin"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(ShardError, match=r"tiny\.bin: 100 bytes is shorter than the 1024-byte"):
        load_shard(path)


def test_split_documents():
    docs = split_documents(np.array([1, 5, 6, 1, 7, 1]))
    assert [d.tolist() for d in docs] == [[1, 5, 6], [1, 7], [1]]
    # A stream that starts mid-document keeps that piece as its own first document.
    assert [d.tolist() for d in split_documents(np.array([4, 1, 2]))] == [[4], [1, 2]]
    assert [d.tolist() for d in split_documents(np.array([3, 4]))] == [[3, 4]]


def test_stream_and_paths(tmp_path):
    write_shard(tmp_path / "fineweb_train_000001.bin", np.array([1, 3]))
    write_shard(tmp_path / "fineweb_train_000000.bin", np.array([1, 2]))
    pattern = str(tmp_path / "fineweb_train_*.bin")
    assert [Path(p).name for p in shard_paths(pattern)] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    np.testing.assert_array_equal(load_stream(pattern), [1, 2, 1, 3])
    with pytest.raises(FileNotFoundError, match="nope_"):
        shard_paths(str(tmp_path / "nope_*.bin"))


def test_writer_cuts_fixed_size_shards(tmp_path):
    w = ShardWriter(tmp_path, "fineweb_train_%06d.bin", shard_tokens=4)
    for chunk in ([1, 2, 3], [1, 4, 5, 6, 7], [1, 8]):
        w.add(np.array(chunk))
    paths = w.close()
    assert [p.name for p in paths] == [f"fineweb_train_{i:06d}.bin" for i in range(3)]
    assert [load_shard(p).tolist() for p in paths] == [[1, 2, 3, 1], [4, 5, 6, 7], [1, 8]]


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data")
def test_official_shards_load():
    train = load_shard(SHARED / "fineweb" / "sp1024" / "fineweb_train_000000.bin")
    val = load_shard(SHARED / "fineweb" / "sp1024" / "fineweb_val_000000.bin")
    assert train.size == 1_048_576 and val.size == 2_021_390
    assert val[0] == BOS_ID and len(split_documents(val)) == 1621 and len(split_documents(train)) == 971
