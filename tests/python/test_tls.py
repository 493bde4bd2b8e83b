"""TLS end to end with the real binary: `handoff certs` makes a CA and certificates, `handoff serve
--tls-cert` serves them, and the Python client and torch loader connect with `grpc+tls://` and
HANDOFF_TLS_CA / HANDOFF_TLS_CA_PEM. A wrong CA, a plain-text client, a CA given with a plain
endpoint, and (under mutual TLS) a client without a certificate are refused with a sentence that
names the fix. (The Spark sink over TLS is in test_spark.py; the controller's certificate wiring
in crates/handoff-controller/tests/e2e.rs.)"""

from __future__ import annotations

import subprocess

import pyarrow as pa
import pytest

from conftest import handoff_bin, make_certs, patience, serve_tls, stop_process
from handoff import HandoffClient, ServerUnavailable, TlsSettings
from handoff.client import ShardRequest


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("pki"), "--client", "trainer")


@pytest.fixture(scope="module")
def tls_server(pki):
    proc, address, token = serve_tls(pki)
    yield address, token
    stop_process(proc)


def test_certs_refuses_to_overwrite(pki):
    out = subprocess.run([str(handoff_bin()), "certs", str(pki)], capture_output=True, text=True,
                         timeout=patience(30))
    assert out.returncode != 0
    assert "exists; remove it or choose another directory" in out.stderr


def test_client_and_loader_over_tls_with_the_ca_from_the_environment(pki, tls_server, monkeypatch):
    address, token = tls_server
    monkeypatch.setenv("HANDOFF_TLS_CA", str(pki / "ca.crt"))
    endpoint = f"grpc+tls://{address}"
    table = pa.table({"id": pa.array(range(1000), pa.int64()),
                      "x": pa.array([float(i) for i in range(1000)], pa.float32())})
    with HandoffClient(endpoint, token) as client:
        client.put("tls", table)
        client.seal("tls")
        assert client.read_all("tls").num_rows == 1000
        rows = sum(b.num_rows for b in client.read_shard(
            ShardRequest(link="tls", rank=0, world_size=2, batch_rows=100)))
        assert rows == 500

    # The torch loader, with the PEM itself in the environment, as the controller injects it.
    torch_mod = pytest.importorskip("handoff.torch")
    monkeypatch.delenv("HANDOFF_TLS_CA")
    monkeypatch.setenv("HANDOFF_TLS_CA_PEM", (pki / "ca.crt").read_text())
    dataset = torch_mod.HandoffDataset("tls", batch_size=250, endpoint=endpoint, token=token,
                                       rank=0, world_size=1)
    ids = [int(i) for batch in dataset for i in batch["id"]]
    assert sorted(ids) == list(range(1000))


def test_a_wrong_ca_is_refused_naming_tls_and_the_ca(tmp_path, tls_server):
    address, token = tls_server
    other = make_certs(tmp_path / "other")
    tls = TlsSettings(root_certs=(other / "ca.crt").read_bytes())
    with HandoffClient(f"grpc+tls://{address}", token, tls=tls, timeout=patience(30)) as client:
        with pytest.raises(ServerUnavailable) as refused:
            client.links()
    message = str(refused.value)
    assert "TLS" in message and "HANDOFF_TLS_CA" in message, message


def test_a_plain_text_client_is_told_to_use_grpc_tls(tls_server):
    address, token = tls_server
    with HandoffClient(f"grpc://{address}", token, tls=TlsSettings(),
                       timeout=patience(30)) as client:
        with pytest.raises(ServerUnavailable) as refused:
            client.links()
    message = str(refused.value)
    assert "grpc+tls://" in message, message


def test_a_ca_with_a_plain_endpoint_is_refused_before_any_token_is_sent(pki, monkeypatch):
    monkeypatch.setenv("HANDOFF_TLS_CA", str(pki / "ca.crt"))
    with pytest.raises(ValueError, match=r"use grpc\+tls://"):
        HandoffClient("grpc://127.0.0.1:1", "secret")
    monkeypatch.setenv("HANDOFF_TLS_CA", str(pki / "missing.crt"))
    with pytest.raises(ValueError, match="cannot read HANDOFF_TLS_CA"):
        HandoffClient("grpc+tls://127.0.0.1:1", "secret")


def test_mutual_tls_serves_only_clients_with_a_certificate(pki, monkeypatch):
    proc, address, token = serve_tls(pki, "--tls-client-ca", str(pki / "ca.crt"))
    try:
        endpoint = f"grpc+tls://{address}"
        ca = (pki / "ca.crt").read_bytes()
        with HandoffClient(endpoint, token, tls=TlsSettings(root_certs=ca),
                           timeout=patience(30)) as anonymous:
            with pytest.raises(ServerUnavailable):
                anonymous.links()
        monkeypatch.setenv("HANDOFF_TLS_CA", str(pki / "ca.crt"))
        monkeypatch.setenv("HANDOFF_TLS_CLIENT_CERT", str(pki / "client.crt"))
        monkeypatch.setenv("HANDOFF_TLS_CLIENT_KEY", str(pki / "client.key"))
        with HandoffClient(endpoint, token, timeout=patience(30)) as client:
            client.put("mtls", pa.table({"id": [1, 2, 3]}))
            assert client.stats("mtls")["rows"] == 3
        # The CLI reads the same variables.
        out = subprocess.run([str(handoff_bin()), "stat", "--endpoint", endpoint, "--token", token,
                              "mtls"], capture_output=True, text=True, timeout=patience(60))
        assert out.returncode == 0, out.stderr
        assert "3" in out.stdout
        monkeypatch.delenv("HANDOFF_TLS_CLIENT_KEY")
        with pytest.raises(ValueError, match="HANDOFF_TLS_CLIENT_KEY"):
            HandoffClient(endpoint, token)
    finally:
        stop_process(proc)
