"""HandoffDataset with real torch against the real server, which runs as its own process (a Flight
server thread inside the training process hangs forked DataLoader workers)."""

from __future__ import annotations

import multiprocessing
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from conftest import eventually, patience
from handoff import HandoffClient, LinkNotFound, ServerUnavailable
from handoff.client import ShardRequest
from handoff.torch import HandoffDataset, to_tensors

# Worker processes come from a fork server: this pytest process has used gRPC (other test modules,
# the dead endpoints below), and a process that has can hang children it forks. Training scripts
# that leave gRPC to HandoffDataset's workers fork safely (see the test that does).
multiprocessing.set_forkserver_preload(["torch", "handoff.torch"])
WORKERS = multiprocessing.get_context("forkserver")


def loader(dataset, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=workers,
                      multiprocessing_context=WORKERS if workers else None)


# Divisible by batch x ranks x workers for every combination below, so padding never repeats a row.
ROWS = 6000
BATCH = 50
DIM = 8


def table(start: int, n: int) -> pa.Table:
    ids = np.arange(start, start + n, dtype=np.int64)
    emb = (ids[:, None] * 10 + np.arange(DIM)[None, :]).astype(np.float32)
    return pa.table({
        "id": ids,
        "emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), DIM),
        "label": (ids % 2).astype(np.int32),
        "name": [f"row-{i}" for i in ids],
    })


@pytest.fixture(scope="module")
def endpoint(server):
    return server.location


@pytest.fixture()
def writer(server):
    """A writing client, closed after the test. No client may stay open in this process while
    DataLoader forks workers: a live gRPC channel in the parent hangs forked children."""
    with HandoffClient(server.location, server.writer_token.decode()) as c:
        yield c


@pytest.fixture(scope="module")
def token(server):
    return server.reader_token.decode()


@pytest.fixture(scope="module")
def features(server):
    """A sealed link of ROWS rows in 4 partitions."""
    link = "torch/features"
    with HandoffClient(server.location, server.writer_token.decode()) as writer:
        for p in range(4):
            writer.put(link, table(p * ROWS // 4, ROWS // 4))
        writer.seal(link)
    return link


def ids_of(batches) -> list[int]:
    out = []
    for b in batches:
        assert torch.equal(b["emb"][:, 0], (b["id"] * 10).to(torch.float32)), "emb travelled with id"
        assert b["name"] == [f"row-{i}" for i in b["id"].tolist()]
        out.extend(b["id"].tolist())
    return out


def epoch(endpoint, token, link, rank, world, workers=0, **kw) -> list[dict]:
    ds = HandoffDataset(link, batch_size=BATCH, rank=rank, world_size=world, endpoint=endpoint,
                        token=token, **kw)
    return list(loader(ds, workers))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_see_every_row_once_with_equal_batch_counts(endpoint, token, features,
                                                                      world, workers):
    per_rank = [epoch(endpoint, token, features, r, world, workers, shuffle=True, seed=3)
                for r in range(world)]
    counts = {len(batches) for batches in per_rank}
    assert counts == {ROWS // BATCH // world}, f"equal batch counts per rank: {counts}"
    assert all(len(b["id"]) == BATCH for batches in per_rank for b in batches)
    seen = [i for batches in per_rank for i in ids_of(batches)]
    assert sorted(seen) == list(range(ROWS)), "every row exactly once"


def test_padding_keeps_batch_counts_equal_when_rows_do_not_divide(endpoint, token, server):
    link = "torch/uneven"
    with HandoffClient(server.location, server.writer_token.decode()) as writer:
        writer.put(link, table(0, 1003))
        writer.seal(link)
    per_rank = [epoch(endpoint, token, link, r, 2, 2) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    seen = Counter(i for batches in per_rank for i in ids_of(batches))
    assert set(seen) == set(range(1003)), "padding wraps around; no row is missing"
    dropped = [epoch(endpoint, token, link, r, 2, 2, drop_last=True) for r in range(2)]
    kept = [i for batches in dropped for i in ids_of(batches)]
    assert len(kept) == len(set(kept)) == 1003 // (4 * BATCH) * 4 * BATCH, "drop_last: no repeats"


def test_set_epoch_reshuffles_deterministically(endpoint, token, features):
    def order(e):
        ds = HandoffDataset(features, batch_size=BATCH, shuffle=True, seed=11, endpoint=endpoint,
                            token=token, rank=0, world_size=1)
        ds.set_epoch(e)
        return ids_of(ds)

    first, again, second = order(0), order(0), order(1)
    assert first == again, "same seed and epoch: same order"
    assert first != second, "a new epoch reshuffles"
    assert sorted(first) == sorted(second) == list(range(ROWS))


def test_rank_and_world_size_come_from_torch_distributed_then_env(endpoint, token, features,
                                                                   monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    from_env = HandoffDataset(features, batch_size=BATCH, endpoint=endpoint, token=token)
    assert ids_of(from_env) == [i for b in epoch(endpoint, token, features, 1, 2) for i in b["id"].tolist()]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        from_dist = HandoffDataset(features, batch_size=BATCH, endpoint=endpoint, token=token)
        assert sorted(ids_of(from_dist)) == list(range(ROWS)), "torch.distributed wins over env"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_yields_exactly_the_rest(endpoint, token, features, workers):
    def dataset():
        ds = HandoffDataset(features, batch_size=BATCH, shuffle=True, seed=5, rank=1, world_size=2,
                            endpoint=endpoint, token=token)
        ds.set_epoch(2)
        return ds

    full = ids_of(loader(dataset(), workers))
    first = dataset()
    taken = []
    for step, batch in enumerate(loader(first, workers)):
        taken.append(batch)
        if step == 6:
            break
    state = first.state_dict(batches=len(taken)) if workers else first.state_dict()
    assert state == {"epoch": 2, "batches": 7}
    resumed = dataset()
    resumed.load_state_dict(state)
    rest = ids_of(loader(resumed, workers))
    assert ids_of(taken) + rest == full, "the resumed epoch finishes exactly the rest, in order"


def test_tensors_share_memory_with_arrow_buffers(endpoint, token, features):
    with HandoffClient(endpoint, token) as client:
        batch = next(iter(client.read_shard(ShardRequest(features, batch_rows=BATCH))))
    tensors = to_tensors(batch)
    ids, emb = batch.column(0), batch.column(1)
    assert tensors["id"].data_ptr() == ids.buffers()[1].address + ids.offset * 8
    values = emb.flatten()
    assert tensors["emb"].shape == (BATCH, DIM) and tensors["emb"].dtype == torch.float32
    assert tensors["emb"].data_ptr() == values.buffers()[1].address + values.offset * 4
    assert tensors["label"].dtype == torch.int32
    assert tensors["name"] == batch.column(3).to_pylist()
    # Sliced columns keep sharing: the tensor starts at the slice.
    sliced = to_tensors(batch.slice(10, 5))
    assert sliced["id"].data_ptr() == ids.buffers()[1].address + 10 * 8
    assert sliced["emb"][0, 0].item() == tensors["emb"][10, 0].item()


def test_equal_length_lists_become_2d_tensors_without_copying():
    values = pa.array(np.arange(12, dtype=np.float32))
    spark_style = pa.ListArray.from_arrays(pa.array([0, 3, 6, 9, 12], pa.int32()), values)
    tensor = to_tensors(pa.record_batch({"emb": spark_style.slice(1)}))["emb"]
    assert tensor.shape == (3, 3) and tensor[0].tolist() == [3.0, 4.0, 5.0]
    assert tensor.data_ptr() == values.buffers()[1].address + 3 * 4
    ragged = pa.array([[1.0], [2.0, 3.0]], pa.list_(pa.float32()))
    assert to_tensors(pa.record_batch({"r": ragged}))["r"] == [[1.0], [2.0, 3.0]]


def test_nulls_and_booleans_are_converted_by_copy():
    batch = pa.record_batch({"x": pa.array([1, None, 3], pa.int64()), "b": [True, False, True]})
    tensors = to_tensors(batch)
    assert tensors["x"].dtype == torch.float64 and torch.isnan(tensors["x"][1])
    assert tensors["b"].tolist() == [True, False, True]
    with_nulls = to_tensors(pa.record_batch({"b": pa.array([True, None, False])}))["b"]
    assert with_nulls.dtype == torch.float32
    assert with_nulls[0].item() == 1.0 and torch.isnan(with_nulls[1]) and with_nulls[2].item() == 0.0
    # Lists with one short row, or whose lengths only sum to a multiple, are not 2-D.
    uneven = pa.array([[1.0, 2.0], [3.0], [4.0, 5.0, 6.0]], pa.list_(pa.float32()))
    assert to_tensors(pa.record_batch({"u": uneven}))["u"] == uneven.to_pylist()


def test_len_is_the_batch_count_once_sealed(endpoint, token, features, writer):
    ds = HandoffDataset(features, batch_size=BATCH, rank=1, world_size=3, endpoint=endpoint,
                        token=token)
    assert len(ds) == len(list(ds)) == ROWS // (3 * BATCH)
    odd = HandoffDataset(features, batch_size=70, rank=0, world_size=2, endpoint=endpoint,
                         token=token, num_workers=2)
    batches = list(loader(odd, 2))
    assert len(loader(odd, 2)) == len(odd) == len(batches)
    writer.put("torch/open", table(0, 100))
    for unsized in (HandoffDataset("torch/open", batch_size=BATCH, endpoint=endpoint, token=token),
                    HandoffDataset(features, batch_size=BATCH, endpoint=endpoint, token=token,
                                   filter="label = 1")):
        with pytest.raises(TypeError, match="no length yet"):
            len(unsized)


def test_set_epoch_reaches_persistent_workers(endpoint, token, features):
    def dataset():
        return HandoffDataset(features, batch_size=BATCH, shuffle=True, seed=9, rank=0,
                              world_size=2, endpoint=endpoint, token=token)

    ds = dataset()
    persistent = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True,
                            multiprocessing_context=WORKERS)
    epochs = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        epochs.append(ids_of(persistent))
    fresh = dataset()
    fresh.set_epoch(1)
    assert epochs[0] != epochs[1], "the workers reshuffled"
    assert epochs[1] == ids_of(loader(fresh, 2)), "as a fresh loader reads epoch 1"


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_skips_batches_in_one_epoch_only(endpoint, token, features, workers):
    ds = HandoffDataset(features, batch_size=BATCH, rank=0, world_size=2, endpoint=endpoint,
                        token=token)
    whole = len(ids_of(loader(ds, workers)))
    ds.load_state_dict({"epoch": 0, "batches": 5})
    assert len(ids_of(loader(ds, workers))) == whole - 5 * BATCH
    # No set_epoch: the next pass over the same epoch is whole again.
    assert len(ids_of(loader(ds, workers))) == whole


def test_stateful_dataloader_restores_each_worker(endpoint, token, features):
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def make():
        ds = HandoffDataset(features, batch_size=BATCH, shuffle=True, seed=3, rank=0,
                            world_size=2, endpoint=endpoint, token=token)
        ds.set_epoch(4)
        return stateful.StatefulDataLoader(ds, batch_size=None, num_workers=2,
                                           multiprocessing_context=WORKERS)

    full = ids_of(make())
    first = make()
    taken = []
    for step, batch in enumerate(first):
        taken.append(batch)
        if step == 8:
            state = first.state_dict()
            break
    del first
    resumed = make()
    resumed.load_state_dict(state)
    assert ids_of(taken) + ids_of(resumed) == full, "the restored workers finish exactly the rest"


def test_joined_messages_yield_the_same_batches_as_one_by_one(endpoint, token, writer):
    """The loader asks for several batches per message and cuts them back: the batches, their
    dtypes and what a transform sees are the same as reading them one by one, also where
    conversion depends on the batch (nulls in some batches, lists ragged in some)."""
    link = "torch/joined"
    n = 1000
    ids = np.arange(n, dtype=np.int64)
    widths = np.where((ids >= 300) & (ids < 310), 3, 2)  # batch 3 (rows 300..399) is ragged
    offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int32)
    writer.put(link, pa.table({
        "id": ids,
        "maybe": pa.array([None if i in (150, 720) else int(i) for i in ids], pa.int64()),
        "flag": pa.array([None if i == 505 else bool(i % 3) for i in ids], pa.bool_()),
        "emb": pa.ListArray.from_arrays(pa.array(offsets),
                                        pa.array(np.arange(offsets[-1], dtype=np.float32))),
        "name": [f"row-{i}" for i in ids],
    }))
    writer.seal(link)

    def read(per_message, **kw):
        return list(HandoffDataset(link, batch_size=100, endpoint=endpoint, token=token,
                                   batches_per_message=per_message, shuffle=True, seed=3, **kw))

    with HandoffClient(endpoint, token) as client:
        messages = list(client.read_shard(ShardRequest(link, batch_rows=100, shuffle=True,
                                                       seed=3, batches_per_message=8)))
    assert [m.num_rows for m in messages] == [800, 200], "the server joins whole batches"
    alone, joined = read(1), read(8)
    assert len(alone) == len(joined) == 10
    for a, j in zip(alone, joined):
        assert a.keys() == j.keys()
        for name in a:
            if isinstance(a[name], torch.Tensor):
                assert a[name].dtype == j[name].dtype, name
                assert torch.equal(a[name].double().nan_to_num(-1), j[name].double().nan_to_num(-1)), name
            else:
                assert a[name] == j[name], name
    kinds = [type(b["maybe"]).__name__ + str(b["maybe"].dtype) for b in joined]
    assert "Tensortorch.float64" in kinds and "Tensortorch.int64" in kinds, kinds
    assert any(isinstance(b["emb"], list) for b in joined)
    assert any(isinstance(b["emb"], torch.Tensor) for b in joined)
    seen = read(8, transform=lambda b: (b.num_rows, b.column(0).to_pylist()))
    assert [rows for rows, _ in seen] == [100] * 10
    assert [i for _, got in seen for i in got] == [i for b in alone for i in b["id"].tolist()]
    with pytest.raises(ValueError, match="batches_per_message"):
        HandoffDataset(link, batches_per_message=65, endpoint=endpoint, token=token)


def test_transform_receives_the_arrow_batch(endpoint, token, features):
    ds = HandoffDataset(features, batch_size=BATCH, endpoint=endpoint, token=token,
                        transform=lambda b: (type(b).__name__, b.num_rows))
    items = list(ds)
    assert items[0] == ("RecordBatch", BATCH) and len(items) == ROWS // BATCH


def test_prefetch_is_bounded_and_an_early_stop_releases_the_read(endpoint, token, features):
    ds = HandoffDataset(features, batch_size=BATCH, endpoint=endpoint, token=token, prefetch=1)
    it = iter(ds)
    next(it)
    time.sleep(0.3)  # the reader runs ahead to its bound; the checks below hold without it too
    threads = [t for t in threading.enumerate() if t.name.startswith("handoff-prefetch")]
    assert len(threads) == 1
    it.close()
    assert not any(t.name.startswith("handoff-prefetch") and t.is_alive()
                   for t in threading.enumerate()), "stopping early stops the reader thread"


def test_streaming_reads_while_the_writer_still_writes(endpoint, token, writer):
    link = "torch/live"
    writer.create(link)
    first_batch_at = []
    sealed_at = []

    def produce():
        for p in range(6):
            writer.put(link, table(p * 1000, 1000))
            time.sleep(0.3)  # a gap between partitions, not a wait for anything
        # Seal only once the reader has shown that it streams, or has had ample time to: a reader
        # that waits for the seal never gets a batch first, however long this waits.
        try:
            eventually("the streaming reader received its first batch", lambda: first_batch_at)
        except AssertionError:
            pass  # the assertion below reports it
        sealed_at.append(time.monotonic())
        writer.seal(link)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    ds = HandoffDataset(link, batch_size=BATCH, streaming=True, endpoint=endpoint, token=token)
    seen = []
    for batch in ds:
        if not first_batch_at:
            first_batch_at.append(time.monotonic())
        seen.extend(batch["id"].tolist())
    producer.join(patience(60))
    assert not producer.is_alive(), "the writer did not finish after the seal"
    assert first_batch_at[0] < sealed_at[0], "training read before the writer finished"
    assert sorted(seen) == list(range(6000))


def test_unreachable_server_and_unknown_link_fail_clearly(endpoint, token):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"grpc://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ServerUnavailable, match="cannot reach the handoff server"):
        list(HandoffDataset("x", batch_size=BATCH, endpoint=dead))
    with pytest.raises(LinkNotFound, match="does not exist.*waited 1 s.*HANDOFF_WAIT_LINK"):
        list(loader(HandoffDataset("torch/nope", batch_size=BATCH, endpoint=endpoint,
                                   token=token, wait_link=1), 2))
    with pytest.raises(LinkNotFound, match="does not exist"):
        list(HandoffDataset("torch/nope", batch_size=BATCH, endpoint=endpoint, token=token,
                            wait_link=0))
    with pytest.raises(ValueError, match="HANDOFF_LINK"):
        HandoffDataset(batch_size=BATCH)


def test_a_reader_waits_for_a_link_created_after_it_started(endpoint, token, server,
                                                             monkeypatch):
    """gate: streaming releases training as the producer starts: the link may not exist yet."""
    link = "torch/late"
    monkeypatch.setenv("HANDOFF_WAIT_LINK", "60")

    def produce():
        time.sleep(1.5)
        with HandoffClient(server.location, server.writer_token.decode()) as w:
            w.put(link, table(0, 1000))
            w.seal(link)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        started = time.monotonic()
        ds = HandoffDataset(link, batch_size=BATCH, endpoint=endpoint, token=token,
                            rank=0, world_size=1)
        assert ds.wait_link == 60
        assert sorted(ids_of(ds)) == list(range(1000))
        assert time.monotonic() - started >= 1.0
    finally:
        producer.join()
    with pytest.raises(ValueError, match="HANDOFF_WAIT_LINK"):
        monkeypatch.setenv("HANDOFF_WAIT_LINK", "soon")
        HandoffDataset(link, batch_size=BATCH, endpoint=endpoint, token=token)


def test_default_fork_workers_in_a_training_process_that_leaves_grpc_to_them(endpoint, token,
                                                                              features):
    script = textwrap.dedent(f"""
        from torch.utils.data import DataLoader
        from handoff.torch import HandoffDataset
        ds = HandoffDataset({features!r}, batch_size={BATCH}, endpoint={endpoint!r}, token={token!r})
        ids = [i for b in DataLoader(ds, batch_size=None, num_workers=2) for i in b["id"].tolist()]
        assert sorted(ids) == list(range({ROWS})), len(ids)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=patience(240))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_read_defaults_come_from_the_datalink_env(endpoint, token, features, monkeypatch):
    """A DataLink's spec.read reaches the loader as HANDOFF_BATCH_ROWS/SHUFFLE/SEED."""
    monkeypatch.setenv("HANDOFF_BATCH_ROWS", "250")
    monkeypatch.setenv("HANDOFF_SHUFFLE", "1")
    monkeypatch.setenv("HANDOFF_SEED", "9")
    ds = HandoffDataset(features, endpoint=endpoint, token=token, rank=0, world_size=1)
    assert (ds.batch_size, ds.shuffle, ds.seed) == (250, True, 9)
    batches = list(loader(ds, 0))
    assert {len(b["id"]) for b in batches[:-1]} == {250}
    ids = [i for b in batches for i in b["id"].tolist()]
    assert sorted(ids) == list(range(ROWS)) and ids != sorted(ids), "shuffled, every row once"
    # Arguments win over the environment.
    assert HandoffDataset(features, batch_size=100, shuffle=False).batch_size == 100
    monkeypatch.setenv("HANDOFF_SHUFFLE", "maybe")
    with pytest.raises(ValueError, match="HANDOFF_SHUFFLE='maybe' is not a boolean"):
        HandoffDataset(features)


def test_columns_and_filter_split_the_passing_rows_across_ranks(endpoint, token, features):
    """Only the asked-for columns arrive, only rows that pass; ranks stay disjoint, complete and
    equal in batch count over those rows."""
    seen, counts = [], []
    for rank in range(3):
        ds = HandoffDataset(features, batch_size=BATCH, endpoint=endpoint, token=token, rank=rank,
                            world_size=3, shuffle=True, seed=3, drop_last=True,
                            columns=["label", "id"], filter="label = 1 AND id < 4500")
        batches = list(loader(ds, 0))
        assert all(set(b) == {"label", "id"} for b in batches), "only the asked-for columns"
        assert all(bool((b["label"] == 1).all()) for b in batches)
        counts.append(len(batches))
        seen += [i for b in batches for i in b["id"].tolist()]
    passing = {i for i in range(4500) if i % 2 == 1}
    assert len(set(counts)) == 1, counts
    assert len(seen) == len(set(seen)) and set(seen) <= passing
    assert len(passing) - len(seen) < 3 * BATCH, "drop_last leaves out less than a batch per rank"
    with pytest.raises(Exception, match="its columns are id, emb, label, name"):
        list(loader(HandoffDataset(features, batch_size=BATCH, endpoint=endpoint, token=token,
                                   columns=["nope"]), 0))
