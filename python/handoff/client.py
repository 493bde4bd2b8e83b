"""The Flight client for a Handoff server: writes (plain and two-phase), link actions, shard reads.

Endpoint and token come from the arguments, else from `HANDOFF_ENDPOINT` and `HANDOFF_TOKEN`.
A `grpc+tls://` endpoint is verified against the CA in `tls_root_certs`, else `HANDOFF_TLS_CA` (a
PEM file) or `HANDOFF_TLS_CA_PEM` (the PEM itself, as the DataLink controller injects it), else
the system's roots; mutual TLS takes `HANDOFF_TLS_CLIENT_CERT` and `HANDOFF_TLS_CLIENT_KEY`.
Every server refusal surfaces as a `HandoffError` carrying the server's sentence, which names the
fix, without pyarrow's gRPC debug context.

A server run as several replicas (`handoff serve --peers ...`) is routed to by itself, as the Rust
client does: the client asks the server it was given for the replicas once, writes each staged
partition to the replica that owns it (`owner`), and sends the planner's actions (create, commit,
abort, seal, stats, delete) to replica 0. A shard read over replicas is planned at replica 0 and
read from every replica the plan names at once (`read_shard`).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.flight as flight

from ._proto import pb

DEFAULT_ENDPOINT = "grpc://127.0.0.1:8815"
# DoPut app_metadata that abandons the stream (handoff_proto::ABORT_PUT).
ABORT_PUT = b"handoff.abort"
# The most replicas a link may be spread over (handoff_proto::placement::MAX_REPLICAS).
MAX_REPLICAS = 1024
# How long a read over replicas waits for the seal when the client has no `timeout`: the planner
# plans only a link sealed on every replica, so the client asks again until then (a single
# server's read waits inside its DoGet, bounded only by `timeout`).
DEFAULT_WAIT_SEAL_SECONDS = 3600.0
# Messages each replica's stream of a read over replicas holds ahead of the batch being taken.
PLAN_PREFETCH = 4
# How long a read over replicas waits for a replica that broke off mid-read (its pod restarting
# and restoring its snapshot) to answer again before the read fails (handoff_client's
# DEFAULT_RESUME_WITHIN).
DEFAULT_RESUME_WITHIN_SECONDS = 60.0

_GRPC_MESSAGE = re.compile(r"(?:gRPC|Flight) returned (?P<code>[a-z ]+) error, with message: (?P<message>.*?)(?:\. gRPC client debug context:.*)?$", re.S)


class HandoffError(Exception):
    """A request the server refused, or could not be sent. `code` is the gRPC status, lower case
    with underscores (`not_found`, `resource_exhausted`, ...), or `unavailable`."""

    def __init__(self, message: str, code: str = "unknown"):
        super().__init__(message)
        self.code = code


class LinkNotFound(HandoffError):
    """The link does not exist (or was deleted)."""


class ServerUnavailable(HandoffError):
    """The server could not be reached."""


def _translate(error: Exception, endpoint: str) -> HandoffError:
    text = str(error)
    match = _GRPC_MESSAGE.search(text)
    code = match.group("code").replace(" ", "_") if match else "unknown"
    message = match.group("message").strip() if match else text.strip()
    if isinstance(error, flight.FlightUnavailableError) or code == "unavailable":
        # The server is there: it says what is not (object storage, the seal of every replica).
        if ("object storage" in message or _NOT_SEALED in message
                or _PEER_UNREACHABLE in message):
            return HandoffError(message, "unavailable")
        if re.search(r"ssl|tls|handshake|certificate", message, re.I):
            hint = ("check that the server's certificate names this host and chains to the CA "
                    "given (HANDOFF_TLS_CA or tls_root_certs=)" if endpoint.startswith("grpc+tls")
                    else "a server started with --tls-cert needs a grpc+tls:// endpoint")
            return ServerUnavailable(
                f"TLS with the handoff server at {endpoint} failed ({message}); {hint}",
                "unavailable")
        return ServerUnavailable(
            f"cannot reach the handoff server at {endpoint} ({message}); check that `handoff serve` "
            f"is running there, or set HANDOFF_ENDPOINT / pass endpoint="
            + ("" if endpoint.startswith("grpc+tls") else
               " (a server started with --tls-cert needs grpc+tls://)"),
            "unavailable",
        )
    if isinstance(error, flight.FlightUnauthenticatedError):
        code = "unauthenticated"
    elif isinstance(error, flight.FlightUnauthorizedError):
        code = "permission_denied"
    elif isinstance(error, flight.FlightTimedOutError):
        code = "deadline_exceeded"
    if code == "not_found":
        return LinkNotFound(message, code)
    return HandoffError(message, code)


# A replica's UNAVAILABLE when it could not reach another replica (replicas.rs, peer_status):
# the server answered, so it is not the client's connection that failed.
_PEER_UNREACHABLE = "is unreachable from this replica"

# The planner's UNAVAILABLE for a read over replicas before the seal (service/replicated.rs); the
# code alone cannot tell it from an unreachable server.
_NOT_SEALED = "is not sealed on every replica yet"


def owner(link: str, partition: int, replicas: int) -> int:
    """The replica, of `replicas`, that holds `partition` of `link`: rendezvous hashing, part of
    the protocol (docs/scale-out.md), so it must match the server's placement bit for bit. Each
    replica scores SHA-256(utf8(link) || 0x00 || le64(partition) || le32(replica)), first 8 bytes
    big-endian; the highest wins, a tie goes to the lower index."""
    if not 0 <= partition < 1 << 64:
        raise ValueError(f"partition is an unsigned 64-bit id, not {partition!r}")
    # Clamped as the server does, so a caller's 0 or a huge count cannot disagree with it.
    count = min(max(replicas, 1), MAX_REPLICAS)
    prefix = link.encode() + b"\x00" + partition.to_bytes(8, "little")

    def score(replica: int) -> Tuple[int, int]:
        digest = hashlib.sha256(prefix + replica.to_bytes(4, "little")).digest()
        return int.from_bytes(digest[:8], "big"), -replica

    return max(range(count), key=score)


def resolve_link(link: Optional[str]) -> str:
    """The link named, else `HANDOFF_LINK`."""
    link = link or os.environ.get("HANDOFF_LINK")
    if not link:
        raise ValueError("no link given: pass link=... or set HANDOFF_LINK")
    return link


@dataclass(frozen=True)
class ShardRequest:
    """One rank's shard of one epoch; mirrors `handoff.v1.ReadShard`."""

    link: str
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    seed: int = 0
    batch_rows: int = 0
    shuffle: bool = False
    drop_last: bool = False
    start_batch: int = 0
    streaming: bool = False
    # Only these columns, in this order (empty: all), and only rows where `filter` (a SQL
    # condition) holds; the shard plan runs over the rows that pass.
    columns: Sequence[str] = ()
    filter: str = ""
    # Up to this many whole batches per message (0 or 1: one each); cut each message at
    # `batch_rows` to get the batches. Saves per-message costs; streaming reads ignore it.
    batches_per_message: int = 0

    def message(self) -> "pb.ReadShard":
        return pb.ReadShard(
            link=self.link, rank=self.rank, world_size=self.world_size, epoch=self.epoch,
            seed=self.seed, batch_rows=self.batch_rows, shuffle=self.shuffle,
            drop_last=self.drop_last, start_batch=self.start_batch,
            mode=pb.READ_MODE_STREAMING if self.streaming else pb.READ_MODE_WAIT_FOR_SEAL,
            columns=list(self.columns), filter=self.filter or "",
            batches_per_message=self.batches_per_message,
        )


@dataclass(frozen=True)
class TlsSettings:
    """What a client needs for TLS, in PEM bytes: the CA to verify the server against (None: the
    system's roots) and, for mutual TLS, its own certificate and key. Plain data, so that a Spark
    driver resolves it once and ships it to executors that may not have its files."""

    root_certs: Optional[bytes] = None
    cert_chain: Optional[bytes] = None
    private_key: Optional[bytes] = None

    @classmethod
    def from_env(cls, ca_file: Optional[str] = None) -> "TlsSettings":
        """`ca_file`, else HANDOFF_TLS_CA (a file) or HANDOFF_TLS_CA_PEM (the PEM); and
        HANDOFF_TLS_CLIENT_CERT / HANDOFF_TLS_CLIENT_KEY (files) for mutual TLS."""

        def read(name: str, path: str) -> bytes:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise ValueError(f"cannot read {name}={path!r}: {e}") from e

        ca_file = ca_file or os.environ.get("HANDOFF_TLS_CA")
        if ca_file:
            root = read("HANDOFF_TLS_CA", ca_file)
        else:
            pem = os.environ.get("HANDOFF_TLS_CA_PEM")
            root = pem.encode() if pem else None
        cert = os.environ.get("HANDOFF_TLS_CLIENT_CERT")
        key = os.environ.get("HANDOFF_TLS_CLIENT_KEY")
        if bool(cert) != bool(key):
            raise ValueError("set both HANDOFF_TLS_CLIENT_CERT and HANDOFF_TLS_CLIENT_KEY, or neither")
        return cls(root_certs=root,
                   cert_chain=read("HANDOFF_TLS_CLIENT_CERT", cert) if cert else None,
                   private_key=read("HANDOFF_TLS_CLIENT_KEY", key) if key else None)

    def given(self) -> bool:
        return any(v is not None for v in (self.root_certs, self.cert_chain, self.private_key))

    def flight_kwargs(self, endpoint: str) -> dict:
        """FlightClient's keyword arguments for `endpoint`. A CA or client certificate with a
        plain-text endpoint is refused: the token would cross the network in clear."""
        if not endpoint.startswith("grpc+tls://"):
            if self.given():
                raise ValueError(
                    f"a TLS CA or client certificate is set, but the endpoint {endpoint!r} is plain "
                    f"text: use grpc+tls://, or unset HANDOFF_TLS_CA / HANDOFF_TLS_CA_PEM")
            return {}
        kwargs = {}
        if self.root_certs is not None:
            kwargs["tls_root_certs"] = self.root_certs
        if self.cert_chain is not None:
            kwargs["cert_chain"] = self.cert_chain
            kwargs["private_key"] = self.private_key
        return kwargs


def normalize_endpoint(endpoint: Optional[str]) -> str:
    """The endpoint given, else HANDOFF_ENDPOINT, else the local default; `host:port` means
    grpc://host:port."""
    endpoint = endpoint or os.environ.get("HANDOFF_ENDPOINT") or DEFAULT_ENDPOINT
    return endpoint if "://" in endpoint else "grpc://" + endpoint


# Pings every 10 s on open calls (the server answers them; it pings idle clients itself).
DEFAULT_KEEPALIVE_SECONDS = 10.0
MAX_KEEPALIVE_SECONDS = 86_400.0


class HandoffClient:
    """A connection to one Handoff server.

    >>> client = HandoffClient()                     # HANDOFF_ENDPOINT, HANDOFF_TOKEN
    >>> client.put("features", table)                # one partition, committed at once
    >>> client.seal("features")
    >>> client.read_all("features").num_rows
    """

    def __init__(self, endpoint: Optional[str] = None, token: Optional[str] = None, *,
                 timeout: Optional[float] = None, tls: Optional[TlsSettings] = None,
                 keepalive: float = DEFAULT_KEEPALIVE_SECONDS,
                 resume_within: float = DEFAULT_RESUME_WITHIN_SECONDS):
        """`keepalive`: seconds between HTTP/2 pings while a call is open, and how long an
        answer may take. A server that vanished without closing the connection (its pod killed,
        its network gone) is then noticed within about twice that, and the call fails with
        `ServerUnavailable` instead of waiting forever.

        `resume_within`: over replicas, how long a shard read waits for a replica that broke
        off mid-read (restarting, restoring its snapshot) to answer again; the read then goes
        on from the first row it did not send."""
        if not resume_within >= 0:
            raise ValueError(f"resume_within is seconds, 0 or more; got {resume_within!r}")
        self._resume_within = float(resume_within)
        # gRPC takes milliseconds as a C int: a day is far inside it.
        if not 0 < keepalive <= MAX_KEEPALIVE_SECONDS:
            raise ValueError(f"keepalive is seconds between pings, more than 0 and at most "
                             f"{MAX_KEEPALIVE_SECONDS:g}; got {keepalive!r}")
        self.endpoint = normalize_endpoint(endpoint)
        token = token if token is not None else os.environ.get("HANDOFF_TOKEN")
        headers = [(b"authorization", b"Bearer " + token.encode())] if token else []
        self._options = flight.FlightCallOptions(headers=headers, timeout=timeout)
        self._timeout = timeout
        # Kept (the environment read once), so that connections to other replicas get the same.
        self._tls = tls if tls is not None else TlsSettings.from_env()
        self._keepalive_ms = max(1, int(keepalive * 1000))
        self._flight = self._connect(self.endpoint)
        # (every replica's endpoint, this server's index), once asked; ([], 0): a single server.
        self._topology: Optional[Tuple[List[str], int]] = None
        # Connections to the other replicas, by index, opened when first needed.
        self._peers: Dict[int, flight.FlightClient] = {}

    def _channel_options(self) -> List[Tuple[str, int]]:
        """gRPC channel arguments of every connection this client opens."""
        ms = self._keepalive_ms
        return [
            ("grpc.keepalive_time_ms", ms), ("grpc.keepalive_timeout_ms", ms),
            # Flow-control pings stand in for keepalive pings while data flows; they time
            # out after a minute unless told otherwise.
            ("grpc.http2.ping_timeout_ms", ms),
            # A reader sends no data while it receives; by default gRPC stops pinging after
            # two pings without data, and a dead server would go unnoticed again.
            ("grpc.http2.max_pings_without_data", 0),
        ]

    def _connect(self, endpoint: str) -> flight.FlightClient:
        tls_kwargs = self._tls.flight_kwargs(endpoint)
        try:
            return flight.FlightClient(endpoint, generic_options=self._channel_options(),
                                       **tls_kwargs)
        except (pa.ArrowException, OSError) as e:
            raise ServerUnavailable(f"bad endpoint {endpoint!r}: {e}", "invalid_argument") from e

    def close(self) -> None:
        for peer in self._peers.values():
            peer.close()
        self._peers.clear()
        self._flight.close()

    # --- replicas -------------------------------------------------------------------------

    def topology(self) -> Tuple[List[str], int]:
        """(every replica's endpoint in index order, the index of the server this client was
        given); ([], 0) for a single server. Asked once: every replica has the same list."""
        if self._topology is None:
            try:
                answer = self._json_action("topology", b"")
            except HandoffError as e:
                # A server from before replicas has no such action: it is a single server.
                if e.code != "invalid_argument":
                    raise
                answer = {}
            replicas = [str(r) for r in answer.get("replicas", [])]
            index = int(answer.get("index", 0))
            if len(replicas) > MAX_REPLICAS or (replicas and not 0 <= index < len(replicas)):
                raise HandoffError(f"the server at {self.endpoint} lists {len(replicas)} replicas "
                                   f"and calls itself replica {index}", "internal")
            self._topology = (replicas, index)
        return self._topology

    def _replica(self, replica: Optional[int]) -> Tuple[flight.FlightClient, str]:
        """The connection to replica `replica` and its endpoint: this client's own for None (no
        need to ask the topology), a single server or the replica it was given, else one opened
        on first use."""
        if replica is None:
            return self._flight, self.endpoint
        replicas, index = self.topology()
        if len(replicas) <= 1 or replica == index:
            return self._flight, self.endpoint
        endpoint = replicas[replica]
        if replica not in self._peers:
            self._peers[replica] = self._connect(endpoint)
        return self._peers[replica], endpoint

    def _owner(self, link: str, partition: int) -> int:
        replicas, index = self.topology()
        return owner(link, partition, len(replicas)) if len(replicas) > 1 else index

    def __enter__(self) -> "HandoffClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, fn, *args, endpoint: Optional[str] = None):
        try:
            return fn(*args)
        except pa.ArrowException as e:
            raise _translate(e, endpoint or self.endpoint) from e

    # --- writes ---------------------------------------------------------------------------

    def _put(self, descriptor: flight.FlightDescriptor, schema: pa.Schema,
             batches: Iterable[pa.RecordBatch], replica: Optional[int] = None) -> int:
        """DoPut to replica `replica`, or to the server this client was given (None)."""
        client, endpoint = self._replica(replica)
        rows = 0

        def run():
            nonlocal rows
            writer, _ = client.do_put(descriptor, schema, self._options)
            try:
                for batch in batches:
                    if batch.num_rows:
                        writer.write_batch(batch)
                        rows += batch.num_rows
            except BaseException:
                # pyarrow cannot cancel a DoPut, and ending it would publish a partial partition:
                # the abort marker makes the server drop the stream.
                try:
                    writer.write_metadata(ABORT_PUT)
                    writer.close()
                except pa.ArrowException:
                    pass  # the server ended the call, as asked
                raise
            writer.close()

        self._call(run, endpoint=endpoint)
        return rows

    def put(self, link: str, data, schema: Optional[pa.Schema] = None) -> int:
        """Append one partition (a Table, a RecordBatch, or batches with `schema`), committed when
        the stream ends. Returns the rows written. Over several replicas, it stays on the one this
        client was given (any replica takes appends)."""
        schema, batches = _batches(data, schema)
        return self._put(flight.FlightDescriptor.for_path(link), schema, batches)

    def put_partition(self, link: str, partition: int, attempt: int, data,
                      schema: Optional[pa.Schema] = None) -> int:
        """Stage one attempt of one partition; invisible until `commit`. Returns the rows. Over
        several replicas it goes to the partition's owner, where its retries land too."""
        schema, batches = _batches(data, schema)
        command = pb.PutPartition(link=link, partition=partition, attempt=attempt)
        return self._put(flight.FlightDescriptor.for_command(command.SerializeToString()), schema,
                         batches, replica=self._owner(link, partition))

    def commit(self, link: str, attempts: Sequence[Tuple[int, int]], *, replace: bool = False) -> dict:
        """Publish exactly these (partition, attempt) pairs, atomically. With `replace`, the link
        then holds only them (an overwrite)."""
        message = pb.Commit(link=link, replace=replace, attempts=[
            pb.PartitionAttempt(partition=p, attempt=a) for p, a in attempts])
        return self._planner_action("commit", message.SerializeToString())

    def abort(self, link: str, attempts: Sequence[Tuple[int, int]] = ()) -> dict:
        """Drop staged attempts; every staged attempt of the link when `attempts` is empty."""
        message = pb.Abort(link=link, attempts=[
            pb.PartitionAttempt(partition=p, attempt=a) for p, a in attempts])
        return self._planner_action("abort", message.SerializeToString())

    # --- link actions ---------------------------------------------------------------------

    def create(self, link: str, *, schema: Optional[pa.Schema] = None, exist_ok: bool = False,
               memory_limit: int = 0, memory_policy: Optional[str] = None,
               ttl_seconds_after_seal: int = 0, ttl_seconds_after_read: int = 0,
               writer_token: str = "", reader_token: str = "") -> dict:
        """Create a link. `writer_token`/`reader_token` give it tokens of its own, valid for it
        alone (needs an admin token)."""
        policies = {None: pb.MEMORY_POLICY_UNSPECIFIED, "reject": pb.MEMORY_POLICY_REJECT,
                    "wait": pb.MEMORY_POLICY_WAIT, "spill": pb.MEMORY_POLICY_SPILL}
        if memory_policy not in policies:
            raise ValueError(f"memory_policy is one of reject, wait, spill; not {memory_policy!r}")
        message = pb.CreateLink(
            link=link, exist_ok=exist_ok, memory_limit=memory_limit,
            memory_policy=policies[memory_policy], ttl_seconds_after_seal=ttl_seconds_after_seal,
            ttl_seconds_after_read=ttl_seconds_after_read,
            writer_token=writer_token, reader_token=reader_token,
            schema=schema.serialize().to_pybytes() if schema is not None else b"")
        return self._planner_action("create", message.SerializeToString())

    def import_parquet(self, link: str, url: str, *, seal: bool = False) -> dict:
        """Fill `link` from Parquet the server can reach (`s3://bucket/path/*.parquet`), all files
        or none; the server's AWS_* environment gives credentials and endpoint."""
        message = pb.Import(link=link, url=url, seal=seal)
        return self._planner_action("import", message.SerializeToString())

    def seal(self, link: str) -> dict:
        return self._planner_action("seal", link.encode())

    def stats(self, link: str) -> dict:
        return self._planner_action("stats", link.encode())

    def delete(self, link: str) -> dict:
        return self._planner_action("delete", link.encode())

    def links(self) -> list:
        """Names of the links this token may see (over replicas, as replica 0 lists them)."""
        client, endpoint = self._replica(0)
        infos = self._call(lambda: list(client.list_flights(b"", self._options)),
                           endpoint=endpoint)
        return ["/".join(p.decode() if isinstance(p, bytes) else p for p in i.descriptor.path)
                for i in infos]

    def _json_action(self, kind: str, body: bytes, replica: Optional[int] = None) -> dict:
        """DoAction at replica `replica`, or at the server this client was given (None)."""
        client, endpoint = self._replica(replica)
        results = self._call(lambda: list(client.do_action(flight.Action(kind, body), self._options)),
                             endpoint=endpoint)
        raw = b"".join(r.body.to_pybytes() for r in results)
        return json.loads(raw) if raw else {}

    def _planner_action(self, kind: str, body: bytes) -> dict:
        # Replica 0 plans: its create/abort/delete/stats reach every replica (elsewhere they are
        # local only), and only it takes commit and seal.
        return self._json_action(kind, body, replica=0)

    # --- reads ----------------------------------------------------------------------------

    def shard_info(self, request: ShardRequest) -> flight.FlightInfo:
        """Schema and totals of a shard (totals are -1 while the link is open). Over replicas,
        replica 0 answers, with the read's plan, once the link is sealed."""
        client, endpoint = self._replica(0)
        descriptor = flight.FlightDescriptor.for_command(request.message().SerializeToString())
        return self._call(client.get_flight_info, descriptor, self._options, endpoint=endpoint)

    def read_shard(self, request: ShardRequest, *,
                   wait_seal: Optional[float] = None) -> Iterator[pa.RecordBatch]:
        """The shard's batches. From one server, as it sends them (a message may join up to
        `batches_per_message` batches). Over replicas, each batch alone, exactly `batch_rows`
        rows (replicas join messages as asked; they are cut here), in the order one server
        would give; the read starts once the link is sealed on every replica and waits for that
        up to `wait_seal` seconds (default: the client's `timeout`, else
        DEFAULT_WAIT_SEAL_SECONDS). A streaming read over replicas yields batches as they
        arrive from any replica."""
        if len(self.topology()[0]) > 1:
            yield from self._read_planned(request, wait_seal)
            return
        ticket = flight.Ticket(pb.Ticket(shard=request.message()).SerializeToString())
        reader = self._call(self._flight.do_get, ticket, self._options)
        finished = False
        try:
            while True:
                try:
                    chunk = reader.read_chunk()
                except StopIteration:
                    finished = True
                    return
                except pa.ArrowException as e:
                    finished = True
                    raise _translate(e, self.endpoint) from e
                if chunk.data is not None and chunk.data.num_rows:
                    yield chunk.data
        finally:
            if not finished:
                # The caller stopped early: tell the server to stop sending.
                reader.cancel()

    def _plan(self, request: ShardRequest, wait_seal: Optional[float]) -> flight.FlightInfo:
        """The read's FlightInfo from replica 0, asked again with a growing pause until the link
        is sealed on every replica, within `wait_seal` seconds. The planner asks every replica
        for its part, so a replica restarting (or the planner) makes it unavailable for a
        moment: that is waited for too, for up to `resume_within` seconds, like a replica that
        breaks off mid-read."""
        if wait_seal is None:
            wait_seal = self._timeout if self._timeout is not None else DEFAULT_WAIT_SEAL_SECONDS
        deadline = time.monotonic() + wait_seal
        down_until: Optional[float] = None  # since the first unavailable answer
        pause = 0.1
        while True:
            try:
                return self.shard_info(request)
            except HandoffError as e:
                now = time.monotonic()
                if _NOT_SEALED in str(e):
                    left = deadline - now
                    if left <= 0:
                        raise HandoffError(
                            f"{e} (waited {wait_seal:g} s for the seal; seal the link, or wait "
                            f"longer with read_shard(wait_seal=...) or the client's timeout=)",
                            e.code) from e
                elif e.code == "unavailable":
                    down_until = down_until or now + self._resume_within
                    left = down_until - now
                    if left <= 0:
                        raise HandoffError(
                            f"the planner could not plan this read within "
                            f"{self._resume_within:g} s: {e}", e.code) from e
                else:
                    raise
                time.sleep(min(pause, left))
                pause = min(pause * 2, 2.0)

    def _read_planned(self, request: ShardRequest,
                      wait_seal: Optional[float]) -> Iterator[pa.RecordBatch]:
        """A shard over replicas: one stream per endpoint of the plan, each read ahead by a
        thread of its own (so every replica sends at once), cut into the plan's pieces."""
        info = self._plan(request, wait_seal)
        replicas, _ = self.topology()
        try:
            about = json.loads(info.app_metadata)
            if about.get("streaming"):
                yield from self._read_streaming(info)
                return
            plan = [list(zip(b[::2], b[1::2])) for b in about["batches"]]
        except (ValueError, KeyError, TypeError) as e:
            raise HandoffError(f"replica 0 ({replicas[0]}) sent a read over replicas without a "
                               f"readable plan ({e})", "internal") from e
        streams: List[_PlannedStream] = []
        try:
            for endpoint in info.endpoints:
                if not endpoint.locations:
                    raise HandoffError("the plan names an endpoint without a location",
                                       "internal")
                client, at = self._at(endpoint)
                streams.append(_PlannedStream(client, at, endpoint.ticket, self._options,
                                              resume_within=self._resume_within))
            for pieces in plan:
                if any(not 0 <= e < len(streams) for e, _ in pieces):
                    raise HandoffError(f"the plan names endpoints {pieces} of {len(streams)}",
                                       "internal")
                parts = [streams[e].take(rows) for e, rows in pieces]
                yield parts[0] if len(parts) == 1 else _concat(parts)
        finally:
            # Done, failed, or the caller stopped early: every thread ends before we return.
            for stream in streams:
                stream.stop()
            for stream in streams:
                stream.join()

    def _read_streaming(self, info: flight.FlightInfo) -> Iterator[pa.RecordBatch]:
        """A streaming read over replicas: every replica's part at once, each batch yielded as
        it arrives from whichever replica sent it; done when every part has ended (the seal)."""
        items: "queue.Queue" = queue.Queue(maxsize=PLAN_PREFETCH * max(1, len(info.endpoints)))
        streams: List[_PlannedStream] = []
        try:
            for endpoint in info.endpoints:
                client, at = self._at(endpoint)
                streams.append(_PlannedStream(client, at, endpoint.ticket, self._options, items))
            ended = 0
            while ended < len(streams):
                item = items.get()
                if item is _END:
                    ended += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for stream in streams:
                stream.stop()
            for stream in streams:
                stream.join()

    def _link_info(self, link: str) -> flight.FlightInfo:
        # Over replicas replica 0 answers, with each endpoint located at its replica.
        client, endpoint = self._replica(0)
        return self._call(client.get_flight_info, flight.FlightDescriptor.for_path(link),
                          self._options, endpoint=endpoint)

    def _at(self, endpoint: flight.FlightEndpoint) -> Tuple[flight.FlightClient, str]:
        """The connection for an endpoint: the replica at its location, else this client's."""
        if not endpoint.locations:
            return self._flight, self.endpoint
        uri = endpoint.locations[0].uri
        uri = uri.decode() if isinstance(uri, bytes) else uri
        replicas, _ = self.topology()
        if uri not in replicas:
            raise HandoffError(f"the server located a part of a link at {uri}, which is not one "
                               f"of its replicas {replicas}", "internal")
        return self._replica(replicas.index(uri))

    def published(self, link: str) -> Dict[int, Tuple[int, int]]:
        """The link's committed partitions: partition id -> (the attempt that wrote it, rows)."""
        out: Dict[int, Tuple[int, int]] = {}
        for endpoint in self._link_info(link).endpoints:
            about = json.loads(endpoint.app_metadata or b"{}")
            if "partition" in about:
                out[int(about["partition"])] = (int(about["attempt"]), int(about["rows"]))
        return out

    def read_all(self, link: str) -> pa.Table:
        """Every committed row of a link, partition by partition in commit order (over
        replicas, replica by replica, each partition read where it is held)."""
        info = self._link_info(link)
        tables = []
        for e in info.endpoints:
            client, at = self._at(e)
            tables.append(self._call(lambda: client.do_get(e.ticket, self._options).read_all(),
                                     endpoint=at))
        return pa.concat_tables(tables) if tables else info.schema.empty_table()


_END = object()


class _Broken:
    """A reader whose opening failed the way a broken stream does: reading it raises that."""

    def __init__(self, error: Exception):
        self._error = error

    def read_chunk(self):
        raise self._error

    def cancel(self) -> None:
        pass


def _skipping(ranges: "pb.ReadRanges", rows: int) -> "pb.ReadRanges":
    """The rest of a ranges read after its first `rows` rows (handoff_proto's
    ReadRanges::skipping)."""
    rest = pb.ReadRanges()
    rest.CopyFrom(ranges)
    del rest.ranges[:]
    left = rows
    for r in ranges.ranges:
        if left >= r.rows:
            left -= r.rows
            continue
        rest.ranges.add(start=r.start + left, rows=r.rows - left)
        left = 0
    return rest


# A stream's end that is its connection's, not a server's refusal: pyarrow reports a server
# that went away as UNAVAILABLE, or as an internal error naming the transport.
_TRANSPORT = re.compile(r"RST_STREAM|GOAWAY|[Ss]ocket closed|[Cc]onnection reset|[Bb]roken pipe|"
                        r"[Ee]nd of TCP stream|[Cc]onnection refused|failed to connect")


def _broke_off(error: Exception) -> bool:
    if isinstance(error, flight.FlightUnavailableError):
        return True
    return isinstance(error, flight.FlightInternalError) and bool(_TRANSPORT.search(str(error)))


class _PlannedStream:
    """One endpoint of a read over replicas: its DoGet at its replica, read by a thread of its
    own into a queue of PLAN_PREFETCH messages, from which `take` cuts rows by count (a replica
    cuts its messages where it likes).

    A replica may break off mid-read: a pod restarted and restoring its snapshot holds the same
    rows in the same order, so the read goes on from the first row not received yet, for up to
    `resume_within` seconds. A replica back without its part (no snapshot) fails the read with
    DATA_LOSS saying how many rows are lost."""

    def __init__(self, client: flight.FlightClient, endpoint: str, ticket: flight.Ticket,
                 options: flight.FlightCallOptions, items: Optional["queue.Queue"] = None,
                 resume_within: float = DEFAULT_RESUME_WITHIN_SECONDS):
        self.endpoint = endpoint
        self._resume_within = resume_within
        self._ranges: Optional["pb.ReadRanges"] = None
        try:
            decoded = pb.Ticket.FromString(ticket.ticket)
            if decoded.WhichOneof("kind") == "ranges":
                self._ranges = decoded.ranges
        except Exception:  # not ours to judge: the replica reads it
            pass
        self.received = 0  # rows received, over every attempt
        self._reopened = False
        # A streaming read shares one queue among its streams (`items`), taken in arrival order.
        self._items: "queue.Queue" = items if items is not None else queue.Queue(
            maxsize=PLAN_PREFETCH)
        self._stopped = threading.Event()
        self._reader = None
        self._pending: Optional[pa.RecordBatch] = None  # rows read and not taken yet
        self._thread = threading.Thread(target=self._run, args=(client, ticket, options),
                                        name=f"handoff-replica-read {endpoint}", daemon=True)
        self._thread.start()

    def _run(self, client, ticket, options) -> None:
        try:
            try:
                self._reader = client.do_get(ticket, options)
            except pa.ArrowException as e:
                # A replica down when the read starts is waited for like one that broke off.
                if self._ranges is None or not _broke_off(e):
                    raise
                self._reader = _Broken(e)
            # Stopped while opening: `stop` may have looked before the reader was there.
            if self._stopped.is_set():
                self._reader.cancel()
                return
            broke_at: Optional[float] = None
            pause = 0.1
            while True:
                try:
                    chunk = self._reader.read_chunk()
                except StopIteration:
                    break
                except pa.ArrowException as e:
                    if self._stopped.is_set():
                        raise
                    if self._ranges is None:
                        if _broke_off(e):
                            raise HandoffError(
                                f"the replica at {self.endpoint} broke off this streaming read "
                                f"after {self.received} rows ({_translate(e, self.endpoint)}); a "
                                f"streaming read cannot go on where it broke: read the link again "
                                f"once it is sealed", "unavailable") from e
                        raise
                    total = sum(r.rows for r in self._ranges.ranges)
                    if not _broke_off(e):
                        if self._reopened:
                            raise self._lost(e, total) from e
                        raise
                    if self.received >= total:
                        break  # every row arrived; only the stream's end did not
                    now = time.monotonic()
                    broke_at = now if broke_at is None else broke_at
                    if now - broke_at >= self._resume_within:
                        raise HandoffError(
                            f"the replica at {self.endpoint} broke off this read after "
                            f"{self.received} of its {total} rows and did not answer again within "
                            f"{self._resume_within:g} s ({_translate(e, self.endpoint)}); once it "
                            f"is back, read the shard again (or resume from the batch reached)",
                            "unavailable") from e
                    self._stopped.wait(min(pause, self._resume_within - (now - broke_at)))
                    pause = min(pause * 2, 2.0)
                    if self._stopped.is_set():
                        return
                    self._reader = self._reopen(client, options, total)
                    continue
                if chunk.data is not None and chunk.data.num_rows:
                    broke_at, pause = None, 0.1
                    self.received += chunk.data.num_rows
                    if not self._put(chunk.data):
                        return
            self._put(_END)
        except pa.ArrowException as e:
            if not self._stopped.is_set():  # else: our own cancel
                error = _translate(e, self.endpoint)
                error.__cause__ = e  # raised in the consumer's thread, with pyarrow's error
                self._put(error)
        except BaseException as e:  # handed to the reader, which raises it
            self._put(e)

    def _reopen(self, client, options, total: int):
        """The rest of the endpoint's rows, asked again of its replica."""
        rest = _skipping(self._ranges, self.received)
        ticket = flight.Ticket(pb.Ticket(ranges=rest).SerializeToString())
        self._reopened = True
        try:
            return client.do_get(ticket, options)
        except pa.ArrowException as e:
            if _broke_off(e):
                return _Broken(e)
            raise self._lost(e, total) from e

    def _lost(self, error: Exception, total: int) -> HandoffError:
        """A reopened read's refusal; NOT_FOUND says the replica came back without the link."""
        translated = _translate(error, self.endpoint)
        if not isinstance(translated, LinkNotFound):
            return translated
        return HandoffError(
            f"the replica at {self.endpoint} broke off this read after {self.received} of its "
            f"{total} rows and came back without link '{self._ranges.link}' (it restarted with "
            f"no snapshot to restore): the other {total - self.received} rows of this rank's "
            f"shard are lost; write the link again, or run its replicas with --snapshot-on-seal "
            f"and --restore-from ({translated})", "data_loss")

    def _put(self, item) -> bool:
        # Bounded wait, so that a full queue never keeps the thread past `stop`.
        while not self._stopped.is_set():
            try:
                self._items.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def take(self, rows: int) -> pa.RecordBatch:
        """The stream's next `rows` rows."""
        parts, have = [], 0
        while have < rows:
            batch, self._pending = self._pending, None
            if batch is None:
                batch = self._items.get()
                if batch is _END:
                    raise HandoffError(f"the replica at {self.endpoint} ended its stream before "
                                       f"the rows the plan gives it", "internal")
                if isinstance(batch, BaseException):
                    raise batch
            if batch.num_rows > rows - have:
                self._pending = batch.slice(rows - have)
                batch = batch.slice(0, rows - have)
            parts.append(batch)
            have += batch.num_rows
        return parts[0] if len(parts) == 1 else _concat(parts)

    def stop(self) -> None:
        self._stopped.set()
        reader = self._reader
        if reader is not None and self._thread.is_alive():
            reader.cancel()  # wakes a read_chunk waiting for the server

    def join(self) -> None:
        self._thread.join()


def _concat(parts: List[pa.RecordBatch]) -> pa.RecordBatch:
    # One batch of several (pa.concat_batches needs pyarrow 19).
    return pa.Table.from_batches(parts).combine_chunks().to_batches()[0]


def _batches(data, schema: Optional[pa.Schema]):
    if isinstance(data, pa.Table):
        return data.schema, data.to_batches()
    if isinstance(data, pa.RecordBatch):
        return data.schema, [data]
    if isinstance(data, pa.RecordBatchReader):
        return data.schema, data
    if schema is None:
        raise ValueError("pass schema= with an iterable of record batches")
    return schema, data
