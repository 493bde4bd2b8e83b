"""Spark writes into a Handoff link, exactly once.

Spark >= 4.0: the Python data source `handoff`

    handoff.spark.register(spark)     # or nothing, when the package is installed (pyspark_handoff)
    df.write.format("handoff").option("link", "features").mode("append").save()

Spark 3.5 (no Python data sources): `handoff.spark.write(df, link="features")`, via `mapInArrow`.

Spark Connect: `register(spark)` registers the format in the Connect server's session (the class is
pickled by reference, so the server's Python needs the package, installed or shipped with
`spark.addArtifacts("handoff.zip", pyfile=True)`). The driver is then the Connect server: options
travel with the plan, but the client's HANDOFF_* variables do not reach it.

Every task stages its partition under (partition id, task attempt id); the driver publishes exactly
the attempts Spark reports as winners with one atomic `commit`, then seals. Retried and
speculative attempts therefore never show up twice. Rows travel as Arrow record batches all the
way; none becomes a Python object.
"""

from __future__ import annotations

import itertools
import os
import secrets
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import pyarrow as pa
from pyspark import TaskContext

from .client import (HandoffClient, HandoffError, LinkNotFound, ServerUnavailable, TlsSettings,
                     normalize_endpoint)

try:
    from pyspark.sql.datasource import DataSource, DataSourceArrowWriter, WriterCommitMessage
except ImportError:  # Spark 3.5 has no Python data sources: `write()` is the way there.
    DataSource = DataSourceArrowWriter = WriterCommitMessage = None

__all__ = ["HandoffDataSource", "HandoffCommitMessage", "HandoffTarget", "register", "write"]

COMMIT_MODES = ("job", "task")
_BOOLEANS = {"true": True, "false": False}
# Said wherever a setting fell back to the environment: with Spark Connect the "driver" is the
# Connect server, whose environment a client cannot set.
_DRIVER_ENV = ("the Spark driver's environment (with Spark Connect, the Connect server's: a "
               "client's environment does not reach it)")


@dataclass(frozen=True)
class HandoffTarget:
    """Where and how a job writes, resolved once on the driver and shipped to the tasks inside the
    pickled writer: executors may not share the driver's environment."""

    link: str
    endpoint: str
    token: Optional[str]
    seal: bool = True
    commit: str = "job"
    # Read on the driver (option `tls_ca`, HANDOFF_TLS_CA, HANDOFF_TLS_CA_PEM) and shipped as PEM.
    tls: TlsSettings = TlsSettings()
    # Where endpoint and token came from, for the driver's error messages; not part of the target.
    endpoint_from: str = field(default="option `endpoint`", compare=False)
    token_from: str = field(default="option `token`", compare=False)

    @classmethod
    def from_options(cls, options: Mapping[str, str],
                     env_name: str = _DRIVER_ENV) -> "HandoffTarget":
        """From data source options (`link`, `endpoint`, `token`, `seal`, `commit`, `tls_ca`: a
        PEM file on the driver, `tls_ca_pem`: the PEM itself), falling back to HANDOFF_LINK,
        HANDOFF_ENDPOINT, HANDOFF_TOKEN and HANDOFF_TLS_CA / HANDOFF_TLS_CA_PEM in the driver's
        environment (`env_name` says whose, in messages): an option always wins. Raises
        ValueError naming the option."""
        link = options.get("link") or os.environ.get("HANDOFF_LINK")
        if not link:
            raise ValueError(
                "the handoff sink needs option `link`: add .option(\"link\", \"<name>\"), or "
                f"set HANDOFF_LINK in {env_name}")
        if options.get("endpoint"):
            endpoint_from = "option `endpoint`"
        elif os.environ.get("HANDOFF_ENDPOINT"):
            endpoint_from = f"HANDOFF_ENDPOINT in {env_name}"
        else:
            endpoint_from = (f"the default, as neither option `endpoint` nor HANDOFF_ENDPOINT in "
                             f"{env_name} is set")
        endpoint = normalize_endpoint(options.get("endpoint"))
        ca_pem = options.get("tls_ca_pem")
        if ca_pem:
            if options.get("tls_ca"):
                raise ValueError("give option `tls_ca` (a PEM file on the driver) or `tls_ca_pem` "
                                 "(the PEM itself), not both")
            if "-----BEGIN" not in ca_pem:
                raise ValueError("option `tls_ca_pem` is the CA's PEM text itself (-----BEGIN "
                                 "CERTIFICATE-----...); for a file on the driver use `tls_ca`")
        tls = TlsSettings.from_env(ca_file=options.get("tls_ca"))
        if ca_pem:
            tls = replace(tls, root_certs=ca_pem.encode())
        tls.flight_kwargs(endpoint)  # refuses a CA with a plain-text endpoint, on the driver
        token = options.get("token")
        token_from = "option `token`"
        if token is None:
            token = os.environ.get("HANDOFF_TOKEN")
            token_from = (f"HANDOFF_TOKEN in {env_name}" if token else
                          f"nowhere: neither option `token` nor HANDOFF_TOKEN in {env_name} is set")
        seal_text = str(options.get("seal", "true")).strip().lower()
        if seal_text not in _BOOLEANS:
            raise ValueError(f"option `seal` is true or false, not {options.get('seal')!r}")
        commit = str(options.get("commit", "job")).strip().lower()
        if commit not in COMMIT_MODES:
            raise ValueError(
                f"option `commit` is `job` (publish at job end) or `task` (each task publishes its "
                f"own partition), not {options.get('commit')!r}")
        return cls(link=link, endpoint=endpoint, token=token or None, seal=_BOOLEANS[seal_text],
                   commit=commit, tls=tls, endpoint_from=endpoint_from, token_from=token_from)

    def client(self) -> HandoffClient:
        # "" rather than None: no token means none, not the executor's own HANDOFF_TOKEN.
        return HandoffClient(self.endpoint, self.token or "", tls=self.tls)

    def check(self, overwrite: bool) -> None:
        """Fail on the driver, before any task runs, when the server is unreachable, the token is
        refused, or the link is sealed."""
        if overwrite and self.commit == "task":
            raise ValueError(
                "option `commit` = `task` cannot overwrite: tasks publish one by one, so the old "
                "contents could not be replaced atomically; use commit=job or mode append")
        with self.client() as client:
            try:
                state = client.stats(self.link).get("state")
            except LinkNotFound:
                state = None  # the first staged partition creates it
            except ServerUnavailable as e:
                if self.endpoint_from == "option `endpoint`":
                    raise
                raise ServerUnavailable(
                    f"{e}. The sink's endpoint came from {self.endpoint_from}; pass "
                    f".option(\"endpoint\", \"grpc://host:port\")", e.code) from e
            except HandoffError as e:
                if e.code in ("unauthenticated", "permission_denied"):
                    if self.token is None:
                        raise HandoffError(
                            f"the handoff server at {self.endpoint} refused a request without a "
                            f"token ({e}); the sink's token came from {self.token_from}; pass a "
                            f"writer token with option `token`", e.code) from e
                    raise HandoffError(
                        f"the handoff server at {self.endpoint} refused the token ({e}), which "
                        f"came from {self.token_from}; pass a writer token with option `token` "
                        f"or HANDOFF_TOKEN", e.code) from e
                raise
        if state == "sealed":
            raise HandoffError(
                f"link {self.link!r} is sealed and takes no more writes; write to a new link or "
                f"delete it first", "failed_precondition")


def new_partition_base() -> int:
    """A random high half for this job's partition ids, so two append jobs into one link never
    stage the same partition id (a committed id cannot be staged again)."""
    return secrets.randbits(31) << 32


def stage_task_output(target: HandoffTarget, base: int,
                      batches: Iterable[pa.RecordBatch]) -> Tuple[int, int, int]:
    """Stage this task's batches under (base + Spark partition id, task attempt id); with
    commit=task, also publish them. Returns (partition, attempt, rows); rows == 0 means nothing
    was staged."""
    context = TaskContext.get()
    partition = base + context.partitionId()
    # Unique across retries and speculative copies, unlike attemptNumber().
    attempt = context.taskAttemptId()
    batches = iter(batches)
    first = next((b for b in batches if b.num_rows), None)
    if first is None:
        return partition, attempt, 0
    seen = [0]

    def counted(source):
        for batch in source:
            seen[0] += batch.num_rows
            yield batch

    source = counted(itertools.chain([first], batches))
    with target.client() as client:
        try:
            rows = client.put_partition(target.link, partition, attempt, source,
                                        schema=first.schema)
        except HandoffError as e:
            if target.commit == "task" and e.code == "already_exists":
                # An earlier attempt of this partition published it and then failed. Count what
                # this attempt reads, so the driver can check that earlier one was whole.
                for _ in source:
                    pass
                return partition, attempt, seen[0]
            raise
        if target.commit == "task":
            try:
                client.commit(target.link, [(partition, attempt)])
            except HandoffError as e:
                if e.code != "already_exists":
                    raise
                # A speculative copy won the race; ours must not linger in staging.
                client.abort(target.link, [(partition, attempt)])
    return partition, attempt, rows


def verify_published(target: HandoffTarget, outcomes: Sequence[Tuple[int, int, int]]) -> None:
    """commit=task, on the driver: every successful task read `rows` rows of its partition, and
    the link must hold that many for it, whichever attempt published them. Spark can end a task's
    input early without an error (a failure upstream of the sink), and that attempt then published
    part of its partition; here that is found and said, never left as silently missing rows."""
    with target.client() as client:
        published = client.published(target.link)
    short = []
    for partition, attempt, rows in sorted(outcomes):
        held_attempt, held = published.get(partition, (None, 0))
        if held != rows:
            by = f"attempt {held_attempt}" if held_attempt is not None else "no attempt"
            short.append(f"partition {partition}: Spark's successful attempt {attempt} read {rows} "
                         f"rows, the link holds {held} (published by {by})")
    if short:
        raise HandoffError(
            f"commit=task: link {target.link!r} does not hold what Spark's successful attempts "
            f"read, so rows are missing: {'; '.join(short)}. An attempt that failed after part of "
            "its input reached the sink published that part. The link is "
            "left unsealed; write it again with commit=job (the default), which publishes only "
            "the attempts Spark reports as successful", "data_loss")


def publish(target: HandoffTarget, attempts: Sequence[Tuple[int, int]], overwrite: bool) -> None:
    """Driver side, once every task succeeded: commit exactly `attempts` (unless the tasks already
    did, commit=task), replacing the link's contents when `overwrite`, then seal unless seal=false."""
    attempts = sorted(attempts)  # rows are numbered in commit order: keep Spark's partition order
    with target.client() as client:
        if target.commit == "job" and attempts:
            client.commit(target.link, attempts, replace=overwrite)
        else:
            # No rows at all (or the tasks committed): the link must still exist for its readers.
            try:
                client.stats(target.link)
            except LinkNotFound:
                client.create(target.link, exist_ok=True)
            if overwrite:
                client.commit(target.link, [], replace=True)
        if target.seal:
            client.seal(target.link)


def discard(target: HandoffTarget, attempts: Sequence[Tuple[int, int]]) -> None:
    """Drop these staged attempts (never an empty list: the server reads that as "all of them")."""
    if attempts:
        with target.client() as client:
            client.abort(target.link, list(attempts))


if DataSource is not None:

    @dataclass
    class HandoffCommitMessage(WriterCommitMessage):
        """What a task staged: partition id, task attempt id, rows (0: nothing staged)."""

        partition: int
        attempt: int
        rows: int

    class HandoffWriter(DataSourceArrowWriter):
        """Pickled on the driver, run once per task; `commit`/`abort` run back on the driver."""

        def __init__(self, target: HandoffTarget, overwrite: bool):
            self.target = target
            self.overwrite = overwrite
            self.base = new_partition_base()

        def write(self, iterator: Iterator[pa.RecordBatch]) -> "HandoffCommitMessage":
            return HandoffCommitMessage(*stage_task_output(self.target, self.base, iterator))

        def commit(self, messages: List[Optional["HandoffCommitMessage"]]) -> None:
            if self.target.commit == "task":
                verify_published(self.target, [(m.partition, m.attempt, m.rows)
                                               for m in messages if m is not None and m.rows])
            publish(self.target, _staged(messages), self.overwrite)

        def abort(self, messages: List[Optional["HandoffCommitMessage"]]) -> None:
            discard(self.target, _staged(messages))

    class HandoffDataSource(DataSource):
        """`df.write.format("handoff")`: options `link`, `endpoint`, `token`, `seal`, `commit`;
        modes append and overwrite."""

        @classmethod
        def name(cls) -> str:
            return "handoff"

        def writer(self, schema, overwrite: bool) -> HandoffWriter:
            target = HandoffTarget.from_options(self.options)
            target.check(overwrite)
            return HandoffWriter(target, overwrite)

else:
    HandoffCommitMessage = HandoffWriter = HandoffDataSource = None


def _staged(messages) -> List[Tuple[int, int]]:
    return [(m.partition, m.attempt) for m in messages if m is not None and m.rows]


def register(spark) -> None:
    """Register the `handoff` format with this session (Spark >= 4.0), a classic one or a Spark
    Connect client's. Not needed when the package is installed normally where the driver runs
    (with Spark Connect: in the Connect server's Python): Spark then finds it through
    `pyspark_handoff`. Over Connect the class is pickled by reference and loaded by the server when
    a write plans, so the server's Python must import `handoff` (installed, or shipped first with
    `spark.addArtifacts("handoff.zip", pyfile=True)`); otherwise that write fails with
    `No module named 'handoff'`."""
    if HandoffDataSource is None:
        raise RuntimeError(
            "this PySpark has no Python data sources (Spark >= 4.0 needed); use handoff.spark.write(df, ...)")
    spark.dataSource.register(HandoffDataSource)


_RESULT_SCHEMA = pa.schema([("partition", pa.int64()), ("attempt", pa.int64()), ("rows", pa.int64())])
_RESULT_DDL = "partition long, attempt long, rows long"


def write(df, link: Optional[str] = None, endpoint: Optional[str] = None,
          token: Optional[str] = None, seal: bool = True, mode: str = "append") -> int:
    """Write `df` into a link through `mapInArrow` (works on Spark 3.5). Returns the rows written.

    Each task stages its partition and reports (partition, attempt, rows); the driver commits the
    attempts of the successful tasks, so retries and speculative copies are not duplicated. Weaker
    than the data source: a failed job has no abort hook, so what its tasks staged stays staged
    (holding server memory, invisible to readers) until the link is sealed or deleted."""
    if mode not in ("append", "overwrite"):
        raise ValueError(f"mode is `append` or `overwrite`, not {mode!r}")
    options = {"link": link, "endpoint": endpoint, "token": token, "seal": str(bool(seal)).lower()}
    # Resolved here, in the calling process (with Spark Connect: the client), not in Spark's driver.
    target = HandoffTarget.from_options({k: v for k, v in options.items() if v is not None},
                                        env_name="this process's environment")
    overwrite = mode == "overwrite"
    target.check(overwrite)
    base = new_partition_base()

    def stage(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        partition, attempt, rows = stage_task_output(target, base, batches)
        yield pa.RecordBatch.from_pylist(
            [{"partition": partition, "attempt": attempt, "rows": rows}], schema=_RESULT_SCHEMA)

    # Spark returns the output of exactly one successful attempt per partition.
    results = df.mapInArrow(stage, _RESULT_DDL).collect()
    publish(target, [(r.partition, r.attempt) for r in results if r.rows], overwrite)
    return sum(r.rows for r in results)
