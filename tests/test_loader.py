"""The packing train loader: the packing policy, rank/accumulation equivalence, wrap-around,
reset, and errors from the prefetch thread."""
import itertools
import time
import traceback

import numpy as np
import pytest
import torch

from data.shards import BOS_ID, ShardError, write_shard
from golf.loader import PackedLoader


def _docs(n, seed=0, max_len=40):
    """n documents: BOS then 0..max_len-1 ordinary tokens (some empty, some longer than a row)."""
    rng = np.random.default_rng(seed)
    return [np.concatenate([[BOS_ID], rng.integers(2, 60000, rng.integers(0, max_len))]) for _ in range(n)]


def _write(tmp_path, stream, cuts):
    """Writes `stream` as shards cut at `cuts` (mid-document on purpose); returns the glob pattern."""
    for i, part in enumerate(np.split(np.asarray(stream), cuts)):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", part)
    return str(tmp_path / "fineweb_train_*.bin")


def _rows(batches):
    """One step's micro-batches -> its rows as seq_len + 1 token windows (inputs + last target)."""
    rows = []
    for x, y in batches:
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
        rows.append(torch.cat([x, y[:, -1:]], dim=1))
    return torch.cat(rows).numpy()


def _global_rows(pattern, seq_len, global_tokens, world, accum, steps):
    """Every rank's loader in this process; per step the rows in global order (micro i, rank r)."""
    loaders = [PackedLoader(pattern, seq_len, global_tokens, accum, r, world) for r in range(world)]
    out = []
    for _ in range(steps):
        per_rank = [ld.next_batch() for ld in loaders]
        out.append(np.concatenate([_rows([per_rank[r][i]]) for i in range(accum) for r in range(world)]))
    for ld in loaders:
        ld.close()
    return np.concatenate(out)


def _pack_by_policy(docs, seq_len, n_rows):
    """The docstring's policy, literally: whole documents in order (cycling), a document that does
    not fit is split and continues the next row; each row then gets the next row's first token."""
    rows, cur, cycle = [], [], itertools.cycle(docs)
    doc = list(next(cycle))
    while len(rows) <= n_rows:
        space = seq_len - len(cur)
        cur, doc = cur + doc[:space], doc[space:]
        if not doc:
            doc = list(next(cycle))
        if len(cur) == seq_len:
            rows.append(cur)
            cur = []
    return np.array([rows[i] + rows[i + 1][:1] for i in range(n_rows)])


def test_small_example(tmp_path):
    # stream 1 2 3 | 1 4 5 6 7 8 | 1 9 (three documents), rows of 4 + 1
    pattern = _write(tmp_path, [1, 2, 3, 1, 4, 5, 6, 7, 8, 1, 9], [5])
    ld = PackedLoader(pattern, seq_len=4, global_tokens=8)  # 2 rows a step
    rows = np.concatenate([_rows(ld.next_batch()) for _ in range(3)])
    ld.close()
    assert rows.tolist() == [[1, 2, 3, 1, 4],   # doc 1, then doc 2 split: its first token ends the row
                             [4, 5, 6, 7, 8],   # ... and its rest starts the next row
                             [8, 1, 9, 1, 2],   # doc 3, then the stream starts again
                             [2, 3, 1, 4, 5],
                             [5, 6, 7, 8, 1],
                             [1, 9, 1, 2, 3]]


def test_packing_policy_and_every_token_once(tmp_path):
    docs = _docs(60)
    stream = np.concatenate(docs)
    pattern = _write(tmp_path, stream, [137, 600])
    seq_len, steps = 16, 6
    ld = PackedLoader(pattern, seq_len, global_tokens=4 * seq_len)
    rows = np.concatenate([_rows(ld.next_batch()) for _ in range(steps)])
    ld.close()
    n = len(rows)
    np.testing.assert_array_equal(rows, _pack_by_policy(docs, seq_len, n))
    # rows minus the shared token are the stream, in order: nothing dropped, nothing repeated
    joined = np.concatenate([rows[0]] + [r[1:] for r in rows[1:]])
    np.testing.assert_array_equal(joined, stream[:n * seq_len + 1])
    # BOS exactly at document starts; a document cut at a row's end goes on in the next row
    doc_starts = np.cumsum([0] + [len(d) for d in docs])[:-1]
    np.testing.assert_array_equal(np.flatnonzero(joined == BOS_ID), doc_starts[doc_starts < len(joined)])
    assert any(rows[i + 1][0] != BOS_ID for i in range(n - 1))  # the test data has such splits


@pytest.mark.parametrize("splits", [[(1, 4), (2, 2), (4, 1), (1, 1), (8, 1)]])
def test_ranks_and_accumulation_see_the_same_global_batch(tmp_path, splits):
    stream = np.concatenate(_docs(80, seed=1))
    pattern = _write(tmp_path, stream, [300, 301, 900])
    seq_len, steps = 8, 7
    global_tokens = 8 * seq_len  # 8 rows a step
    results = {s: _global_rows(pattern, seq_len, global_tokens, *s, steps) for s in splits}
    reference = np.array([stream[n * seq_len: n * seq_len + seq_len + 1] for n in range(8 * steps)])
    for split, rows in results.items():
        np.testing.assert_array_equal(rows, reference, err_msg=f"world, accum = {split}")


def test_rank_slices(tmp_path):
    # step s, micro-step i, rank r: rows s*R + (i*world + r)*rows_per_micro ..., R = rows per step
    stream = np.arange(2, 2000)
    pattern = _write(tmp_path, stream, [])
    seq_len, world, accum = 4, 2, 3
    ld = PackedLoader(pattern, seq_len, global_tokens=12 * seq_len, accum=accum, rank=1, world=world)
    assert ld.rows_per_micro == 2
    for s in range(3):
        for i, (x, _) in enumerate(ld.next_batch()):
            first = s * 12 + (i * world + 1) * 2
            assert x[:, 0].tolist() == [stream[first * seq_len], stream[(first + 1) * seq_len]]
    ld.close()


def test_wraps_to_next_shard_and_back_to_first(tmp_path):
    stream = np.concatenate(_docs(20, seed=2, max_len=12))
    cuts = [len(stream) // 3, len(stream) // 3, 2 * len(stream) // 3]  # includes an empty shard
    pattern = _write(tmp_path, stream, cuts)
    assert len(list(tmp_path.glob("*.bin"))) == 4
    seq_len = 8
    rows_needed = 3 * len(stream) // seq_len  # three passes over the data
    ld = PackedLoader(pattern, seq_len, global_tokens=2 * seq_len, accum=2)  # 1 row per micro-step
    rows = np.concatenate([_rows(ld.next_batch()) for _ in range(rows_needed // 2)])
    ld.close()
    endless = np.tile(stream, 4)
    expected = np.array([endless[n * seq_len: n * seq_len + seq_len + 1] for n in range(len(rows))])
    np.testing.assert_array_equal(rows, expected)


def test_reset_replays_identically(tmp_path):
    pattern = _write(tmp_path, np.concatenate(_docs(50, seed=3)), [400])
    ld = PackedLoader(pattern, 8, global_tokens=32, accum=2)
    first = [_rows(ld.next_batch()) for _ in range(5)]
    time.sleep(0.1)  # let the thread fill its queue, so reset must discard prepared batches
    t0 = time.perf_counter()
    ld.reset()
    assert time.perf_counter() - t0 < 1.0  # a thread blocked on a full queue stops promptly
    again = [_rows(ld.next_batch()) for _ in range(5)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    ld.reset()
    ld.reset()  # twice in a row is fine too
    np.testing.assert_array_equal(_rows(ld.next_batch()), first[0])
    ld.close()
    with pytest.raises(RuntimeError, match="closed; call reset"):
        ld.next_batch()


def test_prefetch_error_reaches_main_thread(tmp_path):
    stream = np.concatenate(_docs(200, seed=4))
    pattern = _write(tmp_path, stream, [len(stream) // 2])
    second = tmp_path / "fineweb_train_000001.bin"
    good = second.read_bytes()
    seq_len, rows_per_step = 16, 2
    ld = PackedLoader(pattern, seq_len, global_tokens=rows_per_step * seq_len)
    second.write_bytes(good[:-10])  # truncated after the loader started: its thread finds out
    steps_in_first = (len(stream) // 2 - 1) // (rows_per_step * seq_len)
    for _ in range(steps_in_first):  # batches from the intact first shard still arrive
        ld.next_batch()
    with pytest.raises(ShardError, match="fineweb_train_000001.bin.*truncated") as info:
        ld.next_batch()
    text = "".join(traceback.format_exception(info.value))
    assert "_host_step" in text and "prefetch thread" in text  # the thread's own frames are shown
    with pytest.raises(ShardError):  # and it stays failed
        ld.next_batch()
    second.write_bytes(good)
    ld.reset()  # a reset starts over cleanly
    ld.next_batch()
    ld.close()


def test_argument_errors(tmp_path):
    pattern = _write(tmp_path, np.arange(2, 100), [])
    with pytest.raises(ValueError, match=r"global_tokens=100 must be a positive multiple of seq_len\*world\*accum = 8\*2\*3 = 48"):
        PackedLoader(pattern, 8, 100, accum=3, rank=0, world=2)
    with pytest.raises(ValueError, match="0 <= rank < world"):
        PackedLoader(pattern, 8, 64, rank=2, world=2)
    with pytest.raises(FileNotFoundError, match="no shard files match"):
        PackedLoader(str(tmp_path / "nothing_*.bin"), 8, 64)
    write_shard(tmp_path / "empty_000000.bin", np.zeros(0, np.uint16))
    with pytest.raises(ValueError, match="hold no tokens"):
        PackedLoader(str(tmp_path / "empty_*.bin"), 8, 64)
