"""A sealed link survives SIGKILL of its server: snapshot on seal, restore in a new process."""

from __future__ import annotations

import signal

import pyarrow as pa
import pyarrow.flight as flight

from conftest import STOP_TIMEOUT_S, start_plain


def start(*args):
    proc, client = start_plain(*args)
    assert client is not None, "handoff serve did not start"
    return proc, client


def read_all(client, link):
    info = client.get_flight_info(flight.FlightDescriptor.for_path(link))
    return pa.concat_tables([client.do_get(e.ticket).read_all() for e in info.endpoints])


def test_snapshot_survives_sigkill(tmp_path):
    url = f"file://{tmp_path}"
    table = pa.table({"id": pa.array(range(50_000), pa.int64()),
                      "emb": pa.FixedSizeListArray.from_arrays(pa.array([float(i % 7) for i in range(400_000)], pa.float32()), 8),
                      "s": [f"s{i}" for i in range(50_000)]})
    proc, client = start("--spill-url", url, "--snapshot-on-seal")
    try:
        for part in (table.slice(0, 20_000), table.slice(20_000)):
            writer, _ = client.do_put(flight.FlightDescriptor.for_path("kept"), table.schema)
            writer.write_table(part, max_chunksize=7_000)
            writer.close()
        list(client.do_action(flight.Action("seal", b"kept")))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    proc, client = start("--restore-from", url)
    try:
        restored = read_all(client, "kept")
        assert restored.equals(table)
        stats = list(client.do_action(flight.Action("stats", b"kept")))[0].body.to_pybytes()
        assert b'"state":"sealed"' in stats
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_TIMEOUT_S) == 0
