"""Writes the committed seed corpus of the fuzz targets: fuzz/corpus/<target>/seed-*.

Run from the repository root with the package sources on the path:
    PYTHONPATH=python python3 fuzz/seeds.py
Seeds are deterministic (fixed random seed), so rerunning changes nothing unless this file does.
"""

from __future__ import annotations

import random
import struct
import sys
from pathlib import Path

import pyarrow as pa

from handoff._proto import pb

ROOT = Path(__file__).resolve().parent / "corpus"


def write(target: str, name: str, data: bytes) -> None:
    directory = ROOT / target
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"seed-{name}").write_bytes(data)


# --- ingest: [mode byte] then (u32 header length, u32 body length, header, body)* --------------

SCHEMA = pa.schema([
    pa.field("id", pa.int64(), nullable=False),
    pa.field("x", pa.float32()),
    pa.field("name", pa.utf8()),
    pa.field("emb", pa.list_(pa.field("item", pa.float32()), 4)),
    pa.field("tags", pa.list_(pa.field("item", pa.int32()))),
    pa.field("flag", pa.bool_()),
    pa.field("nothing", pa.null()),
])


def batch(rows: int, start: int = 0) -> pa.RecordBatch:
    ids = list(range(start, start + rows))
    return pa.record_batch([
        pa.array(ids, pa.int64()),
        pa.array([None if i % 4 == 0 else i / 2 for i in ids], pa.float32()),
        pa.array([None if i % 5 == 0 else f"n{i}" for i in ids]),
        pa.array([None if i % 3 == 0 else [float(i + k) for k in range(4)] for i in ids],
                 pa.list_(pa.field("item", pa.float32()), 4)),
        pa.array([None if i % 2 else list(range(i % 4)) for i in ids], pa.list_(pa.int32())),
        pa.array([None if i % 3 == 1 else i % 2 == 0 for i in ids]),
        pa.nulls(rows),
    ], schema=SCHEMA)


def message(serialized: pa.Buffer) -> tuple[bytes, bytes]:
    m = pa.ipc.read_message(serialized)
    return m.metadata.to_pybytes(), (m.body.to_pybytes() if m.body is not None else b"")


def frames(*messages: tuple[bytes, bytes]) -> bytes:
    return b"".join(struct.pack("<II", len(h), len(b)) + h + b for h, b in messages)


def ingest() -> None:
    schema_message = message(SCHEMA.serialize())
    one, two, empty = (message(batch(n, s).serialize()) for n, s in ((10, 0), (300, 10), (0, 0)))
    write("ingest", "one-batch", b"\x00" + frames(one))
    write("ingest", "three-batches", b"\x00" + frames(one, two, empty))
    write("ingest", "staged", b"\x02" + frames(two, one))
    write("ingest", "own-schema", b"\x01" + frames(schema_message, one, two))
    other = pa.schema([pa.field("id", pa.int64(), nullable=False)])
    write("ingest", "other-schema", b"\x01" + frames(message(other.serialize())))
    # Compressed bodies: the messages of a zstd IPC stream (schema first).
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, SCHEMA,
                           options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_batch(batch(50))
    reader = pa.ipc.MessageReader.open_stream(sink.getvalue())
    zstd = [(m.metadata.to_pybytes(), m.body.to_pybytes() if m.body is not None else b"")
            for m in reader]
    write("ingest", "zstd", b"\x01" + frames(*zstd))
    header, body = one
    write("ingest", "truncated-body", b"\x00" + frames((header, body[: len(body) // 2])))


# --- decode: [kind byte] then the payload --------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def flight_sql(command: str, **fields: bytes) -> bytes:
    """A Flight SQL command as google.protobuf.Any."""
    body = b"".join(field(number, value) for number, value in fields.values())
    return (field(1, f"type.googleapis.com/arrow.flight.protocol.sql.{command}".encode())
            + field(2, body))


def decode() -> None:
    shard = pb.ReadShard(link="l", rank=0, world_size=2, batch_rows=7, shuffle=True, seed=1)
    filtered = pb.ReadShard(link="l", world_size=1, batch_rows=5, columns=["name", "id"],
                            filter="id > 10 AND name LIKE 'n%'")
    streaming = pb.ReadShard(link="open", world_size=1, batch_rows=8,
                             mode=pb.READ_MODE_STREAMING)
    for name, m in (("shard", shard), ("filtered", filtered), ("streaming", streaming)):
        write("decode", f"info-{name}", b"\x00" + m.SerializeToString())
        write("decode", f"ticket-{name}", b"\x02" + pb.Ticket(shard=m).SerializeToString())
    write("decode", "ticket-partition", b"\x02" + pb.Ticket(
        partition=pb.ReadPartition(link="l", index=1 << 63, generation=0)).SerializeToString())
    write("decode", "info-sql", b"\x00" + flight_sql(
        "CommandStatementQuery", query=(1, b"SELECT id, name FROM l WHERE id < 5")))
    write("decode", "info-sql-tables", b"\x00" + flight_sql("CommandGetTables"))
    write("decode", "schema-shard", b"\x04" + shard.SerializeToString())
    for path in ("l", "l/0/2", "open/1/3"):
        write("decode", f"path-{path.replace('/', '-')}", b"\x01" + path.encode())
    attempts = [pb.PartitionAttempt(partition=3, attempt=1)]
    actions = {
        "create": pb.CreateLink(link="new", exist_ok=True, memory_limit=1 << 20,
                                ttl_seconds_after_seal=60).SerializeToString(),
        "commit": pb.Commit(link="open", attempts=attempts).SerializeToString(),
        "abort": pb.Abort(link="open", attempts=attempts).SerializeToString(),
        "seal": b"open",
        "stats": b"l",
        "delete": b"open",
        "snapshot": b"l",
        "import": pb.Import(link="new", url="file:///etc/passwd").SerializeToString(),
    }
    for kind, body in actions.items():
        write("decode", f"action-{kind}", b"\x03" + kind.encode() + b"\x00" + body)
    write("decode", "list", b"\x05")


# --- shard_plan: bytes for `arbitrary` -----------------------------------------------------------


def shard_plan() -> None:
    rng = random.Random(14)
    for i in range(8):
        write("shard_plan", f"random-{i}", bytes(rng.getrandbits(8) for _ in range(64)))
    # Small numbers with the `small` flag set (the last byte arbitrary reads for a bool).
    write("shard_plan", "small", struct.pack("<IIQQQQQ", 1, 2, 16, 0, 1000, 0, 7) + b"\x01\x00\x01")


# --- filter: [projection mask] then the filter text ----------------------------------------------


def filters() -> None:
    texts = [
        "id > 3",
        "x IS NULL AND name LIKE 'n%'",
        "flag",
        "NOT flag OR id % 2 = 0",
        "tags IS NOT NULL AND emb IS NULL",
        "nothing IS NULL",
        "length(name) = 2 AND id BETWEEN 1 AND 6",
        "CAST(id AS DOUBLE) / 0 > 1",
        "id % 0 = 1",
        "abs(id - 9223372036854775807) > 0",
        "name IN ('n1', 'n2', NULL)",
        "((((((((id > 1))))))))",
        " OR ".join(f"id = {i}" for i in range(200)),
        "id > (SELECT 1)",
        "",
    ]
    for i, text in enumerate(texts):
        write("filter", f"text-{i:02}", b"\x7f" + text.encode())
    write("filter", "projection", b"\x05" + b"id > 2")


def main() -> None:
    ingest()
    decode()
    shard_plan()
    filters()
    print(f"wrote {sum(1 for _ in ROOT.rglob('seed-*'))} seeds under {ROOT}", file=sys.stderr)


if __name__ == "__main__":
    main()
