"""A plain pyarrow.flight client against `handoff serve`.

No Handoff code and no generated protobuf code: the few handoff.v1 messages the protocol needs
(PutPartition, Commit, Abort, ReadShard) are hand-encoded below with a tiny varint helper.

Run:  python3 -m pytest tests/python -v   (server binary: $HANDOFF_BIN or target/debug/handoff)
"""

from __future__ import annotations

import json
import random
import threading
import urllib.request
import uuid
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
import pytest

from conftest import eventually, options, patience, rpc_count

# pyarrow.flight.FlightError does not derive from ArrowException, and some gRPC codes map to plain
# Arrow exceptions (NOT_FOUND -> KeyError, INVALID_ARGUMENT -> ArrowInvalid, ...): catch both.
ERRORS = (flight.FlightError, pa.ArrowException)

# --------------------------------------------------------------------------------------------
# protobuf, by hand (proto3: zero values are simply omitted)
# --------------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    assert n >= 0
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _uint(field: int, value: int) -> bytes:
    return _varint(field << 3 | 0) + _varint(value) if value else b""


def _len(field: int, payload: bytes, *, always: bool = False) -> bytes:
    if not payload and not always:
        return b""
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _str(field: int, value: str) -> bytes:
    return _len(field, value.encode("utf-8"))


def put_partition(link: str, partition: int, attempt: int) -> bytes:
    return _str(1, link) + _uint(2, partition) + _uint(3, attempt)


def _attempts(attempts) -> bytes:
    # repeated PartitionAttempt attempts = 2; an all-zero element is still emitted (empty message).
    return b"".join(_len(2, _uint(1, p) + _uint(2, a), always=True) for p, a in attempts)


def commit_msg(link: str, attempts) -> bytes:
    return _str(1, link) + _attempts(attempts)


def abort_msg(link: str, attempts=()) -> bytes:
    return _str(1, link) + _attempts(attempts)


def read_shard(link: str, rank: int = 0, world_size: int = 1, *, epoch: int = 0, seed: int = 0,
               batch_rows: int = 0, shuffle: bool = False, drop_last: bool = False,
               start_batch: int = 0, mode: int = 0) -> bytes:
    return (_str(1, link) + _uint(2, rank) + _uint(3, world_size) + _uint(4, epoch) + _uint(5, seed)
            + _uint(6, batch_rows) + _uint(7, int(shuffle)) + _uint(8, int(drop_last))
            + _uint(9, start_batch) + _uint(10, mode))


def test_protobuf_helper_encodes_like_protoc():
    assert _varint(0) == b"\x00"
    assert _varint(1) == b"\x01"
    assert _varint(300) == b"\xac\x02"
    assert _varint(2**64 - 1) == b"\xff" * 9 + b"\x01"
    # PutPartition{link:"a", partition:1, attempt:150}
    assert put_partition("a", 1, 150) == b"\x0a\x01a\x10\x01\x18\x96\x01"
    # Commit{link:"a", attempts:[{0,0},{2,1}]}
    assert commit_msg("a", [(0, 0), (2, 1)]) == b"\x0a\x01a\x12\x00\x12\x04\x08\x02\x10\x01"
    assert read_shard("l", 1, 2, shuffle=True, mode=1) == b"\x0a\x01l\x10\x01\x18\x02\x38\x01\x50\x01"


# --------------------------------------------------------------------------------------------
# data and small helpers
# --------------------------------------------------------------------------------------------

SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("x", pa.float32()),
    ("s", pa.string()),
    ("vec", pa.list_(pa.float32(), 8)),
])


def make_table(start: int, n: int) -> pa.Table:
    """Rows with ids start..start+n; every column derives from the id, every 97th string is null."""
    ids = pa.array(range(start, start + n), pa.int64())
    x = pc.cast(pc.multiply(ids, 0.25), pa.float32(), safe=False)
    s = pa.array([None if i % 97 == 0 else f"row-{i:09d}" for i in range(start, start + n)], pa.string())
    values = pc.cast(pa.array(range(start * 8, (start + n) * 8), pa.int64()), pa.float32(), safe=False)
    vec = pa.FixedSizeListArray.from_arrays(values, 8)
    return pa.Table.from_arrays([ids, x, s, vec], schema=SCHEMA)


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def path(*parts: str) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_path(*parts)


def cmd(payload: bytes) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(payload)


def put(client, descriptor, table: pa.Table, opts, chunk: int | None = 4096):
    """One DoPut stream; returns the PutResult app_metadata parsed as JSON."""
    writer, meta = client.do_put(descriptor, table.schema, opts)
    try:
        writer.write_table(table, max_chunksize=chunk)
        writer.done_writing()
        buf = meta.read()
    finally:
        writer.close()
    assert buf is not None, "DoPut returned no PutResult"
    return json.loads(buf.to_pybytes())


def action(client, kind: str, body: bytes, opts) -> list:
    return [r.body.to_pybytes() for r in client.do_action(flight.Action(kind, body), opts)]


def action_json(client, kind: str, body: bytes, opts) -> dict:
    results = action(client, kind, body, opts)
    assert len(results) == 1, results
    return json.loads(results[0])


def stats(client, link: str, opts) -> dict:
    return action_json(client, "stats", link.encode(), opts)


def seal(client, link: str, opts) -> dict:
    return action_json(client, "seal", link.encode(), opts)


def get_batches(client, ticket, opts) -> list[pa.RecordBatch]:
    """DoGet, keeping the record batches exactly as they arrived."""
    reader = client.do_get(ticket, opts)
    return [chunk.data for chunk in reader if chunk.data is not None]


def read_endpoints(client, info, opts) -> pa.Table:
    batches = [b for ep in info.endpoints for b in get_batches(client, ep.ticket, opts)]
    return pa.Table.from_batches(batches, schema=info.schema)


def ids(table_or_batches) -> list[int]:
    if isinstance(table_or_batches, list):
        return [i for b in table_or_batches for i in b.column(0).to_pylist()]
    return table_or_batches.column("id").to_pylist()


def shard_batches(client, opts, link, **kw) -> tuple[flight.FlightInfo, list[pa.RecordBatch]]:
    info = client.get_flight_info(cmd(read_shard(link, **kw)), opts)
    assert len(info.endpoints) == 1
    return info, get_batches(client, info.endpoints[0].ticket, opts)


def expect_error(fn, *needles: str, kind=ERRORS):
    with pytest.raises(kind) as ei:
        fn()
    msg = str(ei.value).lower()
    for needle in needles:
        assert needle.lower() in msg, f"expected {needle!r} in error: {ei.value!r}"
    return ei.value


# --------------------------------------------------------------------------------------------
# shared links
# --------------------------------------------------------------------------------------------

# Partition sizes of the shared sealed link; N = 12288 = 3 * 8 * 512 (divisible for shuffle tests,
# and not divisible by 3 * 500 or by 5 for the padding and contiguous-range tests).
SEALED_PARTS = [5000, 3000, 4288]
N_SEALED = sum(SEALED_PARTS)


@pytest.fixture(scope="module")
def sealed_link(client, admin):
    link = uniq("sealed")
    start = 0
    for n in SEALED_PARTS:
        # 777-row record batches: shard batches must cut across stored frames and partitions.
        put(client, path(link), make_table(start, n), admin, chunk=777)
        start += n
    st = seal(client, link, admin)
    assert st["state"] == "sealed" and st["rows"] == N_SEALED
    return link


# --------------------------------------------------------------------------------------------
# basics
# --------------------------------------------------------------------------------------------


def test_http_healthz(server):
    with urllib.request.urlopen(server.http_url + "/healthz", timeout=patience(30)) as resp:
        assert resp.status == 200


def test_list_actions(client, admin):
    kinds = {a.type for a in client.list_actions(admin)}
    assert {"create", "commit", "abort", "seal", "delete", "stats"} <= kinds


def test_put_path_then_read_every_endpoint(client, admin):
    link = uniq("put")
    sizes = [10_000, 1, 25_000, 7_777]
    parts, start = [], 0
    metas = []
    for n in sizes:
        t = make_table(start, n)
        parts.append(t)
        metas.append(put(client, path(link), t, admin))
        start += n
    total = sum(sizes)

    for i, (meta, n) in enumerate(zip(metas, sizes)):
        assert meta["link"] == link
        assert meta["rows"] == n
        assert meta["committed"] is True
        assert meta["bytes"] > 0
        assert meta["attempt"] == 0
    assert [m["partition"] for m in metas] == sorted({m["partition"] for m in metas}), metas

    info = client.get_flight_info(path(link), admin)
    assert info.schema.equals(SCHEMA), info.schema
    assert info.total_records == total
    assert info.total_bytes == sum(m["bytes"] for m in metas)
    assert len(info.endpoints) == len(sizes)
    assert list(info.descriptor.path) == [link.encode()]

    got = read_endpoints(client, info, admin)
    assert got.num_rows == total
    assert sorted(ids(got)) == list(range(total))  # every committed row exactly once
    expected = pa.concat_tables(parts)
    assert got.sort_by("id").equals(expected), "round-tripped values differ"

    # Each endpoint is one partition.
    for ep, n in zip(info.endpoints, sizes):
        assert sum(b.num_rows for b in get_batches(client, ep.ticket, admin)) == n


def test_stats_seal_and_write_after_seal(client, admin):
    link = uniq("stats")
    m1 = put(client, path(link), make_table(0, 3000), admin)
    m2 = put(client, path(link), make_table(3000, 2000), admin)
    st = stats(client, link, admin)
    for key in ["link", "state", "partitions", "rows", "bytes", "staged_partitions", "staged_bytes",
                "memory_bytes", "schema", "server_memory_used", "server_memory_limit"]:
        assert key in st, f"stats lacks {key!r}: {st}"
    assert st["link"] == link
    assert st["state"] == "open"
    assert st["partitions"] == 2
    assert st["rows"] == 5000
    assert st["bytes"] == m1["bytes"] + m2["bytes"]
    assert st["staged_partitions"] == 0 and st["staged_bytes"] == 0
    assert st["memory_bytes"] >= st["bytes"]
    assert st["server_memory_used"] >= st["memory_bytes"]

    sealed = seal(client, link, admin)
    assert sealed["state"] == "sealed"
    assert stats(client, link, admin)["state"] == "sealed"
    expect_error(lambda: put(client, path(link), make_table(5000, 10), admin), "sealed")
    info = client.get_flight_info(path(link), admin)
    assert info.total_records == 5000
    assert sorted(ids(read_endpoints(client, info, admin))) == list(range(5000))


def test_list_flights_one_info_per_link(client, admin):
    links = {uniq("ls"): 100, uniq("ls"): 250}
    for link, n in links.items():
        put(client, path(link), make_table(0, n), admin)
    seen = Counter()
    for info in client.list_flights(b"", admin):
        name = info.descriptor.path[0].decode()
        seen[name] += 1
        if name in links:
            assert info.total_records == links[name]
            assert info.schema.equals(SCHEMA)
            assert len(info.endpoints) == 1
    for link in links:
        assert seen[link] == 1, f"{link} listed {seen[link]} times"
    assert all(c == 1 for c in seen.values()), seen


def test_delete(client, admin):
    link = uniq("del")
    put(client, path(link), make_table(0, 1000), admin)
    action(client, "delete", link.encode(), admin)
    expect_error(lambda: client.get_flight_info(path(link), admin), "does not exist")
    assert link.encode() not in [i.descriptor.path[0] for i in client.list_flights(b"", admin)]


# --------------------------------------------------------------------------------------------
# shards
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 3, 5])
def test_path_shards_are_contiguous_near_equal_and_cover_all(client, reader, sealed_link, world):
    ranges = []
    for rank in range(world):
        info = client.get_flight_info(path(sealed_link, str(rank), str(world)), reader)
        assert len(info.endpoints) == 1
        got = ids(read_endpoints(client, info, reader))
        assert info.total_records == len(got)
        assert got and got == list(range(got[0], got[0] + len(got))), f"rank {rank} rows are not contiguous"
        ranges.append(got)
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1, sizes
    flat = [i for r in ranges for i in r]
    assert sorted(flat) == list(range(N_SEALED))  # disjoint and complete
    assert flat == list(range(N_SEALED)), "ranks are not in rank order"


def test_cmd_batches_pad_by_wrapping(client, reader, sealed_link):
    W, B = 3, 500
    per_rank = -(-N_SEALED // (W * B))  # ceil: 9
    all_ids = []
    for rank in range(W):
        info, batches = shard_batches(client, reader, sealed_link, rank=rank, world_size=W, batch_rows=B)
        assert [b.num_rows for b in batches] == [B] * per_rank, [b.num_rows for b in batches]
        assert info.total_records == per_rank * B
        all_ids += ids(batches)
    assert len(all_ids) == W * per_rank * B
    counts = Counter(all_ids)
    assert set(counts) == set(range(N_SEALED)), "some rows were never read"
    assert max(counts.values()) == 2
    assert sum(c - 1 for c in counts.values()) == W * per_rank * B - N_SEALED


def test_cmd_batches_drop_last(client, reader, sealed_link):
    W, B = 3, 500
    per_rank = N_SEALED // (W * B)  # 8
    all_ids = []
    for rank in range(W):
        _, batches = shard_batches(client, reader, sealed_link, rank=rank, world_size=W, batch_rows=B,
                                   drop_last=True)
        assert [b.num_rows for b in batches] == [B] * per_rank
        all_ids += ids(batches)
    assert len(all_ids) == len(set(all_ids)) == W * per_rank * B
    assert set(all_ids) <= set(range(N_SEALED))


def test_cmd_shuffle_is_a_permutation_per_epoch(client, reader, sealed_link):
    W, B = 3, 512  # N_SEALED == W * B * 8
    per_rank = N_SEALED // (W * B)

    def epoch_read(epoch):
        out = []
        for rank in range(W):
            _, batches = shard_batches(client, reader, sealed_link, rank=rank, world_size=W, batch_rows=B,
                                       shuffle=True, drop_last=True, seed=1234, epoch=epoch)
            assert [b.num_rows for b in batches] == [B] * per_rank
            out.append(ids(batches))
        return out

    e0 = epoch_read(0)
    flat = [i for r in e0 for i in r]
    assert sorted(flat) == list(range(N_SEALED)), "shuffled ranks do not cover every row exactly once"
    assert flat != sorted(flat), "shuffle=true returned rows in order"
    assert epoch_read(0) == e0, "same seed and epoch gave a different order"
    e1 = epoch_read(1)
    assert sorted(i for r in e1 for i in r) == list(range(N_SEALED))
    assert e1 != e0 and e1[0] != e0[0], "a different epoch gave the same order"


@pytest.mark.parametrize("shuffle", [False, True])
def test_cmd_start_batch_resumes(client, reader, sealed_link, shuffle):
    kw = dict(rank=1, world_size=3, batch_rows=500, shuffle=shuffle, seed=7, epoch=3)
    _, full = shard_batches(client, reader, sealed_link, **kw)
    info, resumed = shard_batches(client, reader, sealed_link, start_batch=3, **kw)
    assert [ids([b]) for b in resumed] == [ids([b]) for b in full[3:]]
    assert info.total_records == sum(b.num_rows for b in resumed)


def test_shard_read_waits_for_seal(server, client, admin):
    link = uniq("wait")
    put(client, path(link), make_table(0, 2000), admin)
    info = client.get_flight_info(path(link, "0", "1"), admin)
    out = {}

    def run():
        try:
            out["batches"] = get_batches(client, info.endpoints[0].ticket, options(server.admin_token, 60))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            out["error"] = e

    gets = rpc_count(server.http_url, "do_get")
    th = threading.Thread(target=run, daemon=True)
    th.start()
    # The server counts a DoGet when its stream starts: wait until the read reached it, then give
    # it time (a fixed gap, not a wait for anything) to return early if it were going to.
    eventually("the shard DoGet reached the server", lambda: rpc_count(server.http_url, "do_get") > gets)
    th.join(1.5)
    assert th.is_alive(), f"shard DoGet on an open link returned before the seal: {out}"
    put(client, path(link), make_table(2000, 3000), admin)  # commits while the reader waits
    seal(client, link, admin)
    th.join(patience(60))
    assert not th.is_alive(), "shard DoGet did not finish after the seal"
    assert "error" not in out, out.get("error")
    assert ids(out["batches"]) == list(range(5000))


def test_streaming_mode_emits_before_seal(server, client, admin):
    link = uniq("stream")
    B = 1000
    put(client, path(link), make_table(0, 2000), admin)
    put(client, path(link), make_table(2000, 2000), admin)
    info = client.get_flight_info(cmd(read_shard(link, 0, 1, batch_rows=B, mode=1)), admin)
    received: list[pa.RecordBatch] = []
    out = {}

    def run():
        try:
            for chunk in client.do_get(info.endpoints[0].ticket, options(server.admin_token, 60)):
                if chunk.data is not None:
                    received.append(chunk.data)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    eventually("the streaming read received the 4000 committed rows (or ended)",
               lambda: sum(b.num_rows for b in received) >= 4000 or not th.is_alive())
    assert "error" not in out, out.get("error")
    assert sum(b.num_rows for b in received) == 4000, "streaming read did not deliver committed rows before the seal"
    assert th.is_alive(), "streaming read ended before the seal"
    put(client, path(link), make_table(4000, 3000), admin)
    put(client, path(link), make_table(7000, 1000), admin)
    seal(client, link, admin)
    th.join(patience(60))
    assert not th.is_alive()
    assert "error" not in out, out.get("error")
    assert [b.num_rows for b in received] == [B] * 8
    assert ids(received) == list(range(8000))


# --------------------------------------------------------------------------------------------
# two-phase commit
# --------------------------------------------------------------------------------------------


def test_two_phase_commit(client, admin, writer):
    link = uniq("tpc")
    loser = put(client, cmd(put_partition(link, 0, 0)), make_table(100_000, 1000), writer)
    winner = put(client, cmd(put_partition(link, 0, 1)), make_table(0, 1000), writer)
    other = put(client, cmd(put_partition(link, 1, 0)), make_table(1000, 2000), writer)
    assert (loser["partition"], loser["attempt"], loser["rows"], loser["committed"]) == (0, 0, 1000, False)
    assert (winner["partition"], winner["attempt"], winner["committed"]) == (0, 1, False)
    assert (other["partition"], other["attempt"], other["rows"]) == (1, 0, 2000)

    # Nothing is visible before the commit.
    st = stats(client, link, writer)
    assert st["rows"] == 0 and st["partitions"] == 0
    assert st["staged_partitions"] == 3  # counts staged attempts
    assert st["staged_bytes"] == loser["bytes"] + winner["bytes"] + other["bytes"]
    info = client.get_flight_info(path(link), writer)
    assert info.total_records == 0 and len(info.endpoints) == 0

    res = action_json(client, "commit", commit_msg(link, [(0, 1), (1, 0)]), writer)
    assert res.get("committed") == 2 and res.get("rows") == 3000, res

    info = client.get_flight_info(path(link), admin)
    assert info.total_records == 3000
    assert len(info.endpoints) == 2
    assert sorted(ids(read_endpoints(client, info, admin))) == list(range(3000))  # the loser is gone
    st = stats(client, link, writer)
    assert st["partitions"] == 2 and st["staged_partitions"] == 0 and st["staged_bytes"] == 0

    # A partition commits once, whether by commit or by a late staged write.
    # ALREADY_EXISTS has no dedicated pyarrow exception; pyarrow names the gRPC code in the message.
    expect_error(lambda: action(client, "commit", commit_msg(link, [(0, 1)]), writer),
                 "already committed", "already exists")
    expect_error(lambda: put(client, cmd(put_partition(link, 1, 5)), make_table(0, 10), writer),
                 "already committed", "already exists")

    # Abort: one attempt, then all staged.
    put(client, cmd(put_partition(link, 2, 0)), make_table(3000, 100), writer)
    put(client, cmd(put_partition(link, 3, 0)), make_table(3100, 100), writer)
    put(client, cmd(put_partition(link, 3, 1)), make_table(3100, 100), writer)
    assert stats(client, link, writer)["staged_partitions"] == 3
    action(client, "abort", abort_msg(link, [(3, 1)]), writer)
    assert stats(client, link, writer)["staged_partitions"] == 2
    # An empty list drops every job's staged attempts: an admin's call, refused to a writer.
    expect_error(lambda: action(client, "abort", abort_msg(link), writer), "admin token")
    action(client, "abort", abort_msg(link), admin)
    st = stats(client, link, writer)
    assert st["staged_partitions"] == 0 and st["rows"] == 3000
    expect_error(lambda: action(client, "commit", commit_msg(link, [(2, 0)]), writer), "not staged")
    assert client.get_flight_info(path(link), admin).total_records == 3000


# --------------------------------------------------------------------------------------------
# auth
# --------------------------------------------------------------------------------------------


def test_no_token_is_unauthenticated(client):
    none = flight.FlightCallOptions(timeout=patience(30))
    with pytest.raises(flight.FlightUnauthenticatedError):
        list(client.list_flights(b"", none))
    with pytest.raises(flight.FlightUnauthenticatedError):
        client.get_flight_info(path("whatever"), none)
    with pytest.raises(flight.FlightUnauthenticatedError):
        put(client, path(uniq("anon")), make_table(0, 10), none)


def test_unknown_token_is_unauthenticated(client):
    bad = options(b"not-a-real-token")
    with pytest.raises(flight.FlightUnauthenticatedError):
        list(client.list_flights(b"", bad))
    with pytest.raises(flight.FlightUnauthenticatedError):
        action(client, "stats", b"whatever", bad)


def test_reader_token_may_read_but_not_write(client, admin, reader, sealed_link):
    with pytest.raises(flight.FlightUnauthorizedError):
        put(client, path(uniq("ro")), make_table(0, 10), reader)
    with pytest.raises(flight.FlightUnauthorizedError):
        put(client, path(sealed_link), make_table(0, 10), reader)
    with pytest.raises(flight.FlightUnauthorizedError):
        action(client, "seal", sealed_link.encode(), reader)
    info = client.get_flight_info(path(sealed_link), reader)
    assert sorted(ids(read_endpoints(client, info, reader))) == list(range(N_SEALED))
    assert stats(client, sealed_link, reader)["rows"] == N_SEALED


def test_writer_token_may_write(client, writer, admin):
    link = uniq("w")
    meta = put(client, path(link), make_table(0, 500), writer)
    assert meta["committed"] and meta["rows"] == 500
    seal(client, link, writer)
    assert client.get_flight_info(path(link), admin).total_records == 500


def test_basic_token_handshake(server, client):
    pair = client.authenticate_basic_token("anyone", server.admin_token.decode(),
                                           flight.FlightCallOptions(timeout=patience(30)))
    key, value = (x.encode() if isinstance(x, str) else x for x in pair)
    assert key.lower() == b"authorization"
    assert value.startswith(b"Bearer ")
    opts = flight.FlightCallOptions(timeout=patience(30), headers=[(key, value)])
    link = uniq("basic")
    put(client, path(link), make_table(0, 100), opts)
    assert client.get_flight_info(path(link), opts).total_records == 100
    list(client.list_flights(b"", opts))


def test_basic_token_handshake_refuses_a_bad_password(client):
    with pytest.raises(flight.FlightUnauthenticatedError):
        client.authenticate_basic_token("anyone", "wrong",
                                        flight.FlightCallOptions(timeout=patience(30)))


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_unknown_link_does_not_exist(client, admin):
    missing = uniq("missing")
    # NOT_FOUND surfaces in pyarrow as ArrowKeyError.
    expect_error(lambda: client.get_flight_info(path(missing), admin), "does not exist", kind=pa.ArrowKeyError)
    expect_error(lambda: action(client, "stats", missing.encode(), admin), "does not exist", kind=pa.ArrowKeyError)


def test_schema_mismatch_keeps_earlier_rows(client, admin):
    link = uniq("schema")
    put(client, path(link), make_table(0, 1000), admin)
    other = pa.table({"id": pa.array(range(10), pa.int32()), "y": pa.array([1.0] * 10)})
    expect_error(lambda: put(client, path(link), other, admin), "schema mismatch")
    # Same names, one type changed.
    t = make_table(1000, 10)
    changed = t.set_column(1, "x", pc.cast(t.column("x"), pa.float64()))
    expect_error(lambda: put(client, path(link), changed, admin), "schema mismatch")
    info = client.get_flight_info(path(link), admin)
    assert info.total_records == 1000
    assert info.schema.equals(SCHEMA)
    got = read_endpoints(client, info, admin)
    assert got.sort_by("id").equals(make_table(0, 1000))


def test_do_exchange_is_unimplemented(client, admin):
    def go():
        writer, reader = client.do_exchange(path(uniq("x")), admin)
        try:
            reader.read_all()
        finally:
            writer.close()

    # UNIMPLEMENTED surfaces in pyarrow as ArrowNotImplementedError.
    expect_error(go, "not supported", kind=pa.ArrowNotImplementedError)


def test_dictionary_column_is_refused(client, admin):
    t = pa.table({"id": pa.array(range(100), pa.int64()),
                  "tag": pa.array([f"t{i % 5}" for i in range(100)]).dictionary_encode()})
    expect_error(lambda: put(client, path(uniq("dict")), t, admin), "dictionary")


# --------------------------------------------------------------------------------------------
# large messages
# --------------------------------------------------------------------------------------------


def test_single_48mib_record_batch(client, admin):
    rows = -(-(48 << 20) // 40)  # int64 (8 B) + fixed_size_list<float32>[8] (32 B) per row
    rng = random.Random(48)
    raw = b"".join(rng.randbytes(1 << 20) for _ in range(rows * 32 // (1 << 20) + 1))[: rows * 32]
    bits = pa.Array.from_buffers(pa.uint32(), rows * 8, [None, pa.py_buffer(raw)])
    # Finite floats in [1, 2): keep the mantissa, force the exponent of 1.0.
    values = pc.bit_wise_or(pc.bit_wise_and(bits, pa.scalar(0x007FFFFF, pa.uint32())),
                            pa.scalar(0x3F800000, pa.uint32())).view(pa.float32())
    batch = pa.record_batch([pa.array(range(rows), pa.int64()), pa.FixedSizeListArray.from_arrays(values, 8)],
                            names=["id", "vec"])
    assert batch.nbytes >= 48 << 20
    table = pa.Table.from_batches([batch])

    link = uniq("big")
    meta = put(client, path(link), table, admin, chunk=None)
    assert meta["rows"] == rows
    info = client.get_flight_info(path(link), admin)
    assert info.total_records == rows
    got = read_endpoints(client, info, admin)
    assert got.num_rows == rows
    assert got.equals(table)

    # Re-cut on the way out: two contiguous halves.
    seal(client, link, admin)
    halves = [read_endpoints(client, client.get_flight_info(path(link, str(r), "2"), admin), admin)
              for r in range(2)]
    assert pa.concat_tables(halves).equals(table)
    action(client, "delete", link.encode(), admin)
