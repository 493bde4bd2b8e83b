"""The Python client package: its generated messages, its environment fallbacks, and how it
reports refusals and aborted writes, against the real server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pyarrow as pa
import pytest
from google.protobuf import descriptor_pb2

from conftest import REPO, patience, start_plain_location, stop_process
from handoff import HandoffClient, HandoffError, LinkNotFound, ServerUnavailable, resolve_link
from handoff.client import ShardRequest
from handoff._proto import pb


def test_generated_messages_match_the_proto(tmp_path):
    protoc = shutil.which("protoc")
    assert protoc, "protoc is needed to check python/handoff/_proto (scripts/test.sh installs it)"
    out = tmp_path / "handoff.pb"
    subprocess.run([protoc, "-I", str(REPO / "proto"), "-o", str(out), "handoff.proto"], check=True,
                   timeout=patience(60))
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    # Generated Python code leaves out the derived JSON names; so does the comparison.
    for message in fresh.message_type:
        for field in message.field:
            field.ClearField("json_name")
    checked_in = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert checked_in == fresh, (
        "python/handoff/_proto/handoff_pb2.py is stale: run "
        "`protoc -I proto --python_out=python/handoff/_proto proto/handoff.proto`")


def test_endpoint_token_and_link_fall_back_to_the_environment(server, monkeypatch):
    monkeypatch.setenv("HANDOFF_ENDPOINT", f"{server.grpc_host}:{server.grpc_port}")
    monkeypatch.setenv("HANDOFF_TOKEN", server.admin_token.decode())
    monkeypatch.setenv("HANDOFF_LINK", "client/env")
    with HandoffClient() as client:
        link = resolve_link(None)
        assert client.put(link, pa.table({"a": [1, 2]})) == 2
        assert client.stats(link)["rows"] == 2
    monkeypatch.delenv("HANDOFF_LINK")
    with pytest.raises(ValueError, match="HANDOFF_LINK"):
        resolve_link(None)


def test_refusals_carry_the_servers_sentence(server):
    with HandoffClient(server.location, server.writer_token.decode()) as client:
        with pytest.raises(LinkNotFound, match="does not exist") as missing:
            client.stats("client/nope")
        assert missing.value.code == "not_found"
        client.put("client/typed", pa.table({"a": [1]}))
        with pytest.raises(HandoffError, match="schema mismatch") as mismatch:
            client.put("client/typed", pa.table({"a": ["x"]}))
        assert mismatch.value.code == "invalid_argument"
        assert "gRPC client debug context" not in str(mismatch.value)
    with HandoffClient(server.location, "wrong-token") as client:
        with pytest.raises(HandoffError) as refused:
            client.stats("client/typed")
        assert refused.value.code == "unauthenticated", refused.value
    with HandoffClient("grpc://127.0.0.1:1") as client:
        with pytest.raises(ServerUnavailable, match="cannot reach the handoff server"):
            client.stats("x")


def test_a_write_whose_input_fails_keeps_nothing(server):
    schema = pa.schema([("a", pa.int64())])

    def failing():
        for _ in range(3):
            yield pa.record_batch({"a": list(range(100))}, schema=schema)
        raise RuntimeError("the input broke")

    with HandoffClient(server.location, server.writer_token.decode()) as client:
        with pytest.raises(RuntimeError, match="the input broke"):
            client.put("client/partial", failing(), schema=schema)
        with pytest.raises(RuntimeError):
            client.put_partition("client/partial", 0, 0, failing(), schema=schema)
        stats = client.stats("client/partial")
        assert (stats["rows"], stats["staged_partitions"]) == (0, 0), stats
        assert client.put("client/partial", pa.table({"a": [7]})) == 1, "the client still works"


def test_two_phase_commit_and_replace(server):
    with HandoffClient(server.location, server.writer_token.decode()) as client:
        link = "client/tpc"
        for attempt in (0, 1):
            client.put_partition(link, 0, attempt, pa.table({"a": [attempt] * 3}))
        assert client.commit(link, [(0, 1)]) == {"committed": 1, "rows": 3}
        client.put_partition(link, 1, 0, pa.table({"a": [9]}))
        client.commit(link, [(1, 0)], replace=True)
        client.seal(link)
    with HandoffClient(server.location, server.reader_token.decode()) as reader:
        assert reader.read_all(link).column("a").to_pylist() == [9]


def test_cli_get_reads_columns_and_a_filter(server, tmp_path):
    import subprocess
    import pyarrow.parquet as pq
    from conftest import handoff_bin

    with HandoffClient(server.location, server.writer_token.decode()) as writer:
        writer.put("cli/q", pa.table({"id": list(range(1000)), "split": ["train", "test"] * 500,
                                      "x": [float(i) for i in range(1000)]}))
        writer.seal("cli/q")
    out = tmp_path / "train.parquet"
    done = subprocess.run([str(handoff_bin()), "get", "--endpoint", server.location, "--token",
                           server.reader_token.decode(), "--link", "cli/q", "--out", str(out),
                           "--columns", "x,id", "--filter", "split = 'train' AND id >= 100", "-q"],
                          capture_output=True, text=True, timeout=patience(60))
    assert done.returncode == 0, done.stderr
    got = pq.read_table(out)
    assert got.column_names == ["x", "id"]
    assert got.column("id").to_pylist() == [i for i in range(100, 1000) if i % 2 == 0]


def test_a_server_that_stops_answering_fails_the_read_instead_of_hanging():
    """A server that vanished without closing the connection (a pod killed along with its
    network) is noticed by keepalive pings: the read fails, it does not wait forever. A stopped
    process stands in for it: the kernel still holds the connection, nobody answers pings."""
    proc, location = start_plain_location()
    assert location, "the server did not start"
    try:
        client = HandoffClient(location, keepalive=1.0)
        client.put("big", pa.table({"x": pa.array(np.arange(8_000_000, dtype=np.int64))}))
        client.seal("big")
        batches = client.read_shard(ShardRequest(link="big", batch_rows=65_536))
        next(batches)
        os.kill(proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(ServerUnavailable):
            for _ in batches:  # what the connection had buffered, then the pings go unanswered
                pass
        assert time.monotonic() - started < patience(30)
        with pytest.raises(ValueError, match="keepalive"):
            HandoffClient(location, keepalive=0)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        stop_process(proc)
