#!/usr/bin/env python3
"""Flight throughput benchmark, driven by `handoff bench`. Needs pyarrow only (numpy not required).

  flight_bench.py pyarrow-server --port-file F
      A reference pyarrow FlightServerBase on 127.0.0.1:0 that keeps uploaded batches in a dict
      keyed by the PATH descriptor's first element. Writes its port to F, then serves forever.

  flight_bench.py client --endpoint grpc://127.0.0.1:PORT --size-mib 1024 [--token T] [--pid PID]
                         [--rounds N] [--link L]
      Generates ~size-mib of mixed Arrow data once, then per round: DoPut everything to PATH
      [L-<round>] in one stream; GetFlightInfo + DoGet of every endpoint (read_all); reads the
      server's VmHWM/VmRSS; DoAction "delete" (errors ignored). Prints one JSON object per round:
      {"round", "bytes", "put_s", "put_cpu_s", "get_s", "get_cpu_s", "rss_bytes", "hwm_bytes"}
      bytes = sum of RecordBatch.nbytes; *_cpu_s = server utime+stime during the phase.
      Without --pid the CPU and memory fields are null.

Progress and diagnostics go to stderr; stdout carries only the JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight

# ----------------------------------------------------------------------------------------------
# the reference pyarrow server
# ----------------------------------------------------------------------------------------------


class BenchServer(flight.FlightServerBase):
    def __init__(self, location: str):
        super().__init__(location)
        self._lock = threading.Lock()
        self._flights: dict[str, tuple[pa.Schema, list[pa.RecordBatch]]] = {}

    @staticmethod
    def _key(descriptor: flight.FlightDescriptor) -> str:
        if descriptor.descriptor_type != flight.DescriptorType.PATH or not descriptor.path:
            raise flight.FlightServerError("use a PATH descriptor [link]")
        return descriptor.path[0].decode("utf-8")

    def _get(self, key: str):
        with self._lock:
            try:
                return self._flights[key]
            except KeyError:
                raise KeyError(f"link '{key}' does not exist") from None

    def do_put(self, context, descriptor, reader, writer):
        key = self._key(descriptor)
        batches = []
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                break
            if chunk.data is not None:
                batches.append(chunk.data)
        with self._lock:
            self._flights[key] = (reader.schema, batches)

    def get_flight_info(self, context, descriptor):
        key = self._key(descriptor)
        schema, batches = self._get(key)
        rows = sum(b.num_rows for b in batches)
        nbytes = sum(b.nbytes for b in batches)
        endpoint = flight.FlightEndpoint(key.encode("utf-8"), [])
        return flight.FlightInfo(schema, descriptor, [endpoint], rows, nbytes)

    def do_get(self, context, ticket):
        schema, batches = self._get(ticket.ticket.decode("utf-8"))
        return flight.RecordBatchStream(pa.Table.from_batches(batches, schema=schema))

    def list_flights(self, context, criteria):
        with self._lock:
            keys = list(self._flights)
        for key in keys:
            try:
                yield self.get_flight_info(context, flight.FlightDescriptor.for_path(key))
            except KeyError:
                continue

    def list_actions(self, context):
        return [("delete", "Drop a link. Body: the link name (UTF-8)")]

    def do_action(self, context, action):
        # Not part of the pyarrow baseline's protocol proper, but without it the baseline's memory
        # would grow by size-mib every round and its RSS/HWM would not be comparable to Handoff's.
        if action.type == "delete":
            with self._lock:
                self._flights.pop(action.body.to_pybytes().decode("utf-8"), None)
            return []
        raise NotImplementedError(f"action '{action.type}' is not supported")


def run_pyarrow_server(args) -> int:
    server = BenchServer(f"grpc://{args.host}:0")  # binds and starts serving here
    tmp = f"{args.port_file}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{server.port}\n")
    os.replace(tmp, args.port_file)  # atomic: readers never see a partial file
    print(f"pyarrow flight server listening on {args.host}:{server.port}", file=sys.stderr, flush=True)
    server.serve()
    return 0


# ----------------------------------------------------------------------------------------------
# data generation (pyarrow.compute only: splitmix64 over a row counter)
# ----------------------------------------------------------------------------------------------

U64 = pa.uint64()
U32 = pa.uint32()
MASK64 = (1 << 64) - 1
VEC_DIM = 128
# int64 + float64 + float32 + 128 x float32 + ~16 string bytes + 4 offset bytes
ROW_BYTES = 8 + 8 + 4 + VEC_DIM * 4 + 16 + 4


def _u64(v: int) -> pa.Scalar:
    return pa.scalar(v & MASK64, U64)


def _counter(n: int, start: int) -> pa.Array:
    """start, start+1, ..., start+n-1 as uint64, without a Python-level loop."""
    ones = pa.repeat(pa.scalar(1, U64), n) if hasattr(pa, "repeat") else pa.array([1] * n, U64)
    return pc.add(pc.cumulative_sum(ones), _u64(start - 1))


def random_u64(n: int, stream: int) -> pa.Array:
    """n pseudo-random uint64 (splitmix64 of a counter); deterministic per stream."""
    z = pc.multiply(pc.add(_counter(n, 1), _u64(stream * 0x9E3779B97F4A7C15 * 0x100000001)),
                    _u64(0x9E3779B97F4A7C15))
    z = pc.multiply(pc.bit_wise_xor(z, pc.shift_right(z, _u64(30))), _u64(0xBF58476D1CE4E5B9))
    z = pc.multiply(pc.bit_wise_xor(z, pc.shift_right(z, _u64(27))), _u64(0x94D049BB133111EB))
    return pc.bit_wise_xor(z, pc.shift_right(z, _u64(31)))


def _as(arr: pa.Array, typ: pa.DataType, length: int) -> pa.Array:
    return pa.Array.from_buffers(typ, length, [None, arr.buffers()[1]])


def random_f64(n: int, stream: int) -> pa.Array:
    bits = random_u64(n, stream)
    # Uniform in [1, 2): random mantissa, exponent of 1.0 (no NaN or infinity).
    bits = pc.bit_wise_or(pc.bit_wise_and(bits, _u64(0x000FFFFFFFFFFFFF)), _u64(0x3FF0000000000000))
    return _as(bits, pa.float64(), n)


def random_f32(n: int, stream: int) -> pa.Array:
    bits = _as(random_u64((n + 1) // 2, stream), U32, n)
    bits = pc.bit_wise_or(pc.bit_wise_and(bits, pa.scalar(0x007FFFFF, U32)), pa.scalar(0x3F800000, U32))
    return _as(bits, pa.float32(), n)


def random_strings(n: int, stream: int) -> pa.Array:
    """n ASCII strings of 8..24 characters (16 on average)."""
    lens = pc.add(pc.bit_wise_and(random_u64(n, stream), _u64(15)), _u64(8))
    lens = pc.add(lens, pc.bit_wise_and(pc.shift_right(random_u64(n, stream + 1), _u64(60)), _u64(1)))
    ends = pc.cast(pc.cumulative_sum(lens), pa.int32())
    total = ends[-1].as_py() if n else 0
    offsets = pa.concat_arrays([pa.array([0], pa.int32()), ends])
    chars = random_u64((total + 7) // 8, stream + 2)
    # Every byte into '0'..'o' (0x30..0x6f): printable ASCII, valid UTF-8.
    chars = pc.add(pc.bit_wise_and(chars, _u64(0x3F3F3F3F3F3F3F3F)), _u64(0x3030303030303030))
    return pa.Array.from_buffers(pa.utf8(), n, [None, offsets.buffers()[1], chars.buffers()[1]])


def make_batch(rows: int, first_id: int, stream: int) -> pa.RecordBatch:
    ids = _as(_counter(rows, first_id), pa.int64(), rows)
    vec = pa.FixedSizeListArray.from_arrays(random_f32(rows * VEC_DIM, stream + 3), VEC_DIM)
    return pa.record_batch(
        [ids, random_f64(rows, stream), random_f32(rows, stream + 1), vec, random_strings(rows, stream + 4)],
        names=["id", "f64", "f32", "vec", "s"],
    )


def generate(size_mib: float, batch_rows: int) -> list[pa.RecordBatch]:
    total_rows = max(1, int(size_mib * (1 << 20)) // ROW_BYTES)
    batches, start = [], 0
    while start < total_rows:
        rows = min(batch_rows, total_rows - start)
        batches.append(make_batch(rows, start, stream=len(batches) * 16))
        start += rows
    return batches


# ----------------------------------------------------------------------------------------------
# the client
# ----------------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def server_cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def server_memory(pid: int | None) -> tuple[int | None, int | None]:
    """(VmRSS, VmHWM) in bytes."""
    if pid is None:
        return None, None
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024  # kB
    return values.get("VmRSS"), values.get("VmHWM")


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else round(after - before, 6)


def run_client(args) -> int:
    t0 = time.perf_counter()
    batches = generate(args.size_mib, args.batch_rows)
    schema = batches[0].schema
    nbytes = sum(b.nbytes for b in batches)
    rows = sum(b.num_rows for b in batches)
    print(f"generated {len(batches)} batches, {rows} rows, {nbytes / (1 << 20):.1f} MiB "
          f"in {time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)

    headers = [(b"authorization", b"Bearer " + args.token.encode())] if args.token else []
    opts = flight.FlightCallOptions(headers=headers)
    client = flight.FlightClient(args.endpoint)
    try:
        for rnd in range(args.rounds):
            link = f"{args.link}-{rnd}"
            descriptor = flight.FlightDescriptor.for_path(link)

            cpu0, t0 = server_cpu_s(args.pid), time.perf_counter()
            writer, meta = client.do_put(descriptor, schema, opts)
            for batch in batches:
                writer.write_batch(batch)
            writer.done_writing()
            meta.read()  # the PutResult, if the server sends one
            writer.close()
            t1, cpu1 = time.perf_counter(), server_cpu_s(args.pid)

            info = client.get_flight_info(descriptor, opts)
            got_rows = 0
            for endpoint in info.endpoints:
                table = client.do_get(endpoint.ticket, opts).read_all()
                got_rows += table.num_rows
                del table
            t2, cpu2 = time.perf_counter(), server_cpu_s(args.pid)
            rss, hwm = server_memory(args.pid)
            if got_rows != rows:
                print(f"round {rnd}: read {got_rows} rows, wrote {rows}", file=sys.stderr, flush=True)
                return 1

            try:
                for _ in client.do_action(flight.Action("delete", link.encode()), opts):
                    pass
            except (flight.FlightError, pa.ArrowException) as e:
                print(f"delete {link}: {e}", file=sys.stderr, flush=True)

            print(json.dumps({
                "round": rnd,
                "bytes": nbytes,
                "put_s": round(t1 - t0, 6),
                "put_cpu_s": _delta(cpu1, cpu0),
                "get_s": round(t2 - t1, 6),
                "get_cpu_s": _delta(cpu2, cpu1),
                "rss_bytes": rss,
                "hwm_bytes": hwm,
            }), flush=True)
    finally:
        client.close()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    srv = sub.add_parser("pyarrow-server", help="run the reference pyarrow Flight server")
    srv.add_argument("--port-file", required=True, help="write the listening port here once serving")
    srv.add_argument("--host", default="127.0.0.1")
    srv.set_defaults(func=run_pyarrow_server)

    cli = sub.add_parser("client", help="put and get generated data, one JSON line per round")
    cli.add_argument("--endpoint", required=True, help="e.g. grpc://127.0.0.1:8815")
    cli.add_argument("--size-mib", type=float, default=1024)
    cli.add_argument("--token", default=os.environ.get("HANDOFF_TOKEN", ""))
    cli.add_argument("--pid", type=int, default=None, help="server process id, for CPU and memory")
    cli.add_argument("--rounds", type=int, default=3)
    cli.add_argument("--link", default="bench")
    cli.add_argument("--batch-rows", type=int, default=65536)
    cli.set_defaults(func=run_client)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
