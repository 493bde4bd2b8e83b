"""`HandoffDataset`: one rank's shard of a Handoff link as a torch `IterableDataset`.

    loader = DataLoader(HandoffDataset("features", batch_size=1024, shuffle=True),
                        batch_size=None, num_workers=2)

The server cuts the batches (`batch_size` rows each), so give the DataLoader `batch_size=None`.
Rank and world size come from `torch.distributed` when it is initialised, else from `RANK` and
`WORLD_SIZE` (as the Training Operator sets them), else 0 and 1. DataLoader workers split the
rank's shard further: worker w of W reads as rank `rank * W + w` of `world_size * W`, so every
rank still gets the same number of batches, and the DataLoader's round-robin order is the order of
the server's batches.

Each batch is a dict of column name to tensor. Fixed-width columns without nulls and fixed-size
lists of them (as 2-D tensors) share memory with the Arrow buffers, through DLPack. Strings come as
lists of `str`. For anything else, pass `transform`, which receives the `pyarrow.RecordBatch` and
returns what the dataset yields.

Pitfall: do not run a Flight *server* as a thread of the training process. Forked DataLoader
workers inherit its gRPC state and hang. Run `handoff serve` as its own process (the controller
runs it as its own pod). Clients are fine: each worker opens its own after the fork.
"""

from __future__ import annotations

import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from .client import HandoffClient, LinkNotFound, ShardRequest, TlsSettings, resolve_link

# How long a reader waits for a link that does not exist yet: a DataLink with `gate: streaming`
# may start training a moment before the producer's first write.
DEFAULT_WAIT_LINK_SECONDS = 300
# Batches per message the loader asks for (the server's bound is 64, and it keeps messages within
# 8 MiB). benches/loader.py, 1024-row batches: 8 kept 59 % of a raw DoGet's rows/s, 32 kept
# 80-100 %; a message's memory is held until all of its batches are dropped.
DEFAULT_BATCHES_PER_MESSAGE = 32
MAX_BATCHES_PER_MESSAGE = 64

__all__ = ["HandoffDataset", "to_tensors", "column_to_tensor"]


def _dlpack(array: pa.Array) -> torch.Tensor:
    try:
        capsule = array.__dlpack__(max_version=(1, 0))
    except TypeError:  # pyarrow before the versioned protocol
        capsule = array.__dlpack__()
    return torch.from_dlpack(capsule)


def _zero_copy_ok(array: pa.Array) -> bool:
    return array.null_count == 0 and (
        pa.types.is_integer(array.type) or pa.types.is_floating(array.type))


def _uniform_width(column: pa.Array) -> Optional[int]:
    """The length every row of a list column has, or None: read off the offsets, which for equal
    lengths step evenly (no compute kernel per batch)."""
    offsets = column.offsets.to_numpy()  # honours the column's slice
    rows = len(column)
    span = int(offsets[-1]) - int(offsets[0])
    if span % rows:
        return None
    width = span // rows
    steps = np.diff(offsets)
    return width if bool((steps == width).all()) else None


def column_to_tensor(column: pa.Array) -> Any:
    """A column as a tensor where it is numbers, as a list where it is not.

    Zero-copy for integer and float columns without nulls, and for (nested) fixed-size lists of
    them, which become 2-D (N-D) tensors; so are lists whose rows all have the same length (how
    Spark sends an embedding). Booleans and columns with nulls are copied (nulls become
    NaN, so integers with nulls become float64 and booleans with nulls float32, 1.0 for true).
    Strings and other types become Python lists.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_fixed_size_list(column.type) and column.null_count == 0:
        values = column.flatten()  # honours the column's offset
        inner = column_to_tensor(values)
        if isinstance(inner, torch.Tensor):
            return inner.reshape(len(column), column.type.list_size, *inner.shape[1:])
        return column.to_pylist()
    if (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) \
            and column.null_count == 0 and len(column) > 0:
        # Spark has no fixed-size lists: an embedding arrives as a list whose rows all have the
        # same length, and then its values are one contiguous block.
        width = _uniform_width(column)
        if width is not None:
            inner = column_to_tensor(column.flatten())
            if isinstance(inner, torch.Tensor):
                return inner.reshape(len(column), width, *inner.shape[1:])
        return column.to_pylist()
    if _zero_copy_ok(column):
        return _dlpack(column)
    if pa.types.is_boolean(column.type):
        if column.null_count == 0:
            return torch.from_numpy(column.to_numpy(zero_copy_only=False))
        # True 1.0, False 0.0, null NaN: a bool tensor has no room for a missing value.
        return torch.from_numpy(column.cast(pa.float32()).to_numpy(zero_copy_only=False))
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        return torch.from_numpy(column.to_numpy(zero_copy_only=False))
    return column.to_pylist()


def to_tensors(batch: pa.RecordBatch) -> Dict[str, Any]:
    """A record batch as a dict of column name to tensor (or list, for strings and the like)."""
    return {name: column_to_tensor(column) for name, column in zip(batch.schema.names, batch.columns)}


def _cut(message: pa.RecordBatch, rows: int, convert: Callable[[pa.RecordBatch], Any]) -> list:
    """A message of several whole batches (`batches_per_message`) as its batches, converted.

    The message is converted once and its tensors split into views: one DLPack hand-off per
    column per message rather than per batch, which is most of what a loader costs per batch.
    Each batch comes out exactly as if it had arrived alone: a column whose conversion depends on
    the batch (nulls, lists ragged somewhere in the message) converts batch by batch."""
    n = message.num_rows
    if n <= rows:
        return [convert(message)]
    starts = range(0, n, rows)
    if convert is not to_tensors:  # a transform sees each batch as a RecordBatch
        return [convert(message.slice(start, rows)) for start in starts]
    columns: Dict[str, list] = {}
    for name, column in zip(message.schema.names, message.columns):
        whole = None if column.null_count else column_to_tensor(column)
        if isinstance(whole, torch.Tensor):
            columns[name] = list(whole.split(rows))
        elif whole is not None and not _is_list(column.type):
            # Python values (strings and the like) whichever batch: slice the one conversion.
            columns[name] = [whole[start:start + rows] for start in starts]
        else:
            columns[name] = [column_to_tensor(column.slice(start, rows)) for start in starts]
    return [{name: pieces[i] for name, pieces in columns.items()} for i in range(len(starts))]


def _is_list(kind: pa.DataType) -> bool:
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)
            or pa.types.is_fixed_size_list(kind))


def _distributed_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


_END = object()

# Run by `HandoffDataset.__len__` in a child process: the shard totals, summed in batches.
_COUNT = """
import pickle, sys
import pyarrow.flight as flight
from handoff.client import HandoffClient
endpoint, token, tls, requests, batch = pickle.load(sys.stdin.buffer)
total = 0
with HandoffClient(endpoint, token, tls=tls) as client:
    # Replica 0 plans reads over replicas (a single server is its own replica 0).
    planner, at = client._replica(0)
    for raw in requests:
        descriptor = flight.FlightDescriptor.for_command(raw)
        info = client._call(planner.get_flight_info, descriptor, client._options, endpoint=at)
        if info.total_records < 0:
            print("unknown")
            sys.exit(0)
        total += -(-info.total_records // batch)
print(total)
"""


def _batches_in_child(endpoint, token, tls, requests, batch: int, link: str) -> int:
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [package] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    try:
        child = subprocess.run([sys.executable, "-c", _COUNT], env=env, capture_output=True,
                               input=pickle.dumps((endpoint, token, tls, requests, batch)),
                               timeout=120)
    except subprocess.TimeoutExpired:
        raise TypeError(f"link {link!r} has no length: the server did not answer in 120 s") \
            from None
    out = child.stdout.decode().strip()
    if child.returncode != 0:
        why = (child.stderr.decode().strip().splitlines() or ["no output"])[-1]
        raise TypeError(f"link {link!r} has no length: {why}")
    if out == "unknown":
        raise TypeError(f"link {link!r} has no length yet: it is not sealed, or a filter decides "
                        "the rows; iterate it instead")
    return int(out)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a whole number; fix or unset it") from None


def _env_bool(name: str, default: bool) -> bool:
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return default
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={text!r} is not a boolean (1/0, true/false); fix or unset it")


class HandoffDataset(IterableDataset):
    """One rank's shard of a link, re-batched by the server into `batch_size` rows.

    Arguments:
        link: the link; default `HANDOFF_LINK`.
        batch_size: rows per batch (the server cuts them; give the DataLoader `batch_size=None`).
            Default: $HANDOFF_BATCH_ROWS, else 1024.
        shuffle: a full, deterministic shuffle over (seed, epoch); call `set_epoch` every epoch.
            Default: $HANDOFF_SHUFFLE, else off.
        seed: the shuffle seed, the same on every rank. Default: $HANDOFF_SEED, else 0.
        columns: read only these columns, in this order; the server never decodes the others.
        filter: read only rows where this SQL condition holds, e.g. "split = 'train'". Ranks
            split the rows that pass, with the same guarantees (disjoint, complete, equal
            batch counts).
        drop_last: drop the rows that do not fill a batch on every rank; otherwise the shard wraps
            around to the start to pad them (as `DistributedSampler` does).
        streaming: start before the link is sealed and read batches as partitions are committed
            (no shuffle); the epoch ends at the seal.
        rank, world_size: override what `torch.distributed` / `RANK` / `WORLD_SIZE` say.
        transform: called with each `pyarrow.RecordBatch`; its result is yielded instead of the
            dict of tensors.
        prefetch: messages read ahead of the training loop by a background thread (each of up
            to `batches_per_message` batches).
        batches_per_message: how many whole batches the server may send in one message, which
            the loader cuts back into batches: per-message costs (a gRPC message, a decode, a
            tensor per column) are then paid once for several batches. 1 sends each alone.
        endpoint, token: default `HANDOFF_ENDPOINT` and `HANDOFF_TOKEN`.
        tls: CA and client certificate for a grpc+tls:// endpoint; default from HANDOFF_TLS_CA,
            HANDOFF_TLS_CA_PEM, HANDOFF_TLS_CLIENT_CERT and HANDOFF_TLS_CLIENT_KEY.
        wait_link: seconds to wait for a link that does not exist yet before failing with
            LinkNotFound; 0 fails at once. Default: $HANDOFF_WAIT_LINK, else 300.
        num_workers: the DataLoader's `num_workers`, for `len()` only: workers split a rank's
            shard among them, which can change the rank's batch count by the padding.
    """

    def __init__(self, link: Optional[str] = None, batch_size: Optional[int] = None, *,
                 shuffle: Optional[bool] = None, seed: Optional[int] = None,
                 drop_last: bool = False,
                 streaming: bool = False, rank: Optional[int] = None,
                 world_size: Optional[int] = None,
                 transform: Optional[Callable[[pa.RecordBatch], Any]] = None,
                 prefetch: int = 2, endpoint: Optional[str] = None, token: Optional[str] = None,
                 columns: Optional[Sequence[str]] = None, filter: Optional[str] = None,
                 tls: Optional[TlsSettings] = None, wait_link: Optional[float] = None,
                 num_workers: int = 0, batches_per_message: int = DEFAULT_BATCHES_PER_MESSAGE):
        super().__init__()
        if wait_link is None:
            wait_link = _env_int("HANDOFF_WAIT_LINK", DEFAULT_WAIT_LINK_SECONDS)
        if wait_link < 0:
            raise ValueError("wait_link is seconds to wait for the link to exist; 0 or more")
        self.wait_link = float(wait_link)
        self.num_workers = num_workers
        # Defaults a DataLink's `spec.read` hands to the job through the environment.
        if batch_size is None:
            batch_size = _env_int("HANDOFF_BATCH_ROWS", 1024)
        if shuffle is None:
            shuffle = _env_bool("HANDOFF_SHUFFLE", False)
        if seed is None:
            seed = _env_int("HANDOFF_SEED", 0)
        if batch_size <= 0:
            raise ValueError("batch_size must be positive: it is the rows per batch the server cuts")
        if streaming and shuffle:
            raise ValueError("streaming reads cannot shuffle (the whole link is not there yet); "
                             "turn one of them off")
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        if not 1 <= batches_per_message <= MAX_BATCHES_PER_MESSAGE:
            raise ValueError(f"batches_per_message must be 1 to {MAX_BATCHES_PER_MESSAGE}")
        self.batches_per_message = batches_per_message
        self.link = resolve_link(link)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.streaming = streaming
        self.rank = rank
        self.world_size = world_size
        self.transform = transform
        self.prefetch = prefetch
        if isinstance(columns, str):
            raise ValueError("columns is a list of names, e.g. columns=['x', 'label']")
        self.columns = tuple(columns or ())
        self.filter = filter or ""
        self.endpoint = endpoint
        self.token = token
        self.tls = tls
        # Epoch and a pending resume, in shared memory: DataLoader workers get a copy of the
        # dataset, and persistent ones keep it across epochs, so set_epoch and load_state_dict
        # must reach them through something they share. [epoch, resume epoch (-1: none),
        # batches to skip]
        self._shared = torch.tensor([0, -1, 0], dtype=torch.int64).share_memory_()
        # Batches this process yielded this epoch (in a worker: that worker's).
        self._taken = 0
        # A resume restored inside one DataLoader worker (torchdata's StatefulDataLoader):
        # (epoch, batches that worker had yielded).
        self._worker_resume: Optional[tuple[int, int]] = None
        self._length: Optional[int] = None

    # --- epochs and resuming ----------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return int(self._shared[0])

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for this epoch; every rank must call it with the same number. It reaches
        DataLoader workers, persistent ones included."""
        if epoch != self.epoch:
            self._taken = 0
            self._shared[1] = -1
            self._worker_resume = None
        self._shared[0] = epoch

    def state_dict(self, batches: Optional[int] = None) -> Dict[str, Any]:
        """Where this epoch stands. In the training process with DataLoader workers the count
        lives in the workers, so pass `batches`: how many the training loop took this epoch.
        torchdata's StatefulDataLoader calls this inside each worker, where it is that worker's
        own count, and restores each worker with it."""
        state: Dict[str, Any] = {"epoch": self.epoch,
                                 "batches": self._taken if batches is None else batches}
        info = get_worker_info()
        if info is not None:
            state["worker"] = [info.id, info.num_workers]
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume mid-epoch: the next iteration of that epoch yields exactly the remaining
        batches; the one after it is a whole epoch again."""
        epoch, taken = int(state["epoch"]), int(state["batches"])
        if taken < 0:
            raise ValueError(f"batches is {taken}; a resume skips 0 or more batches")
        info = get_worker_info()
        worker = state.get("worker")
        if worker is not None:
            if info is None or list(worker) != [info.id, info.num_workers]:
                raise ValueError(
                    f"this state is DataLoader worker {worker[0]} of {worker[1]}'s; restore it "
                    "through the same StatefulDataLoader with the same num_workers")
            self._shared[0] = epoch
            self._worker_resume = (epoch, taken)
            return
        self._shared[0] = epoch
        self._shared[1] = epoch
        self._shared[2] = taken

    def __len__(self) -> int:
        """Batches one epoch yields on this rank, once the link is sealed (with `num_workers`,
        the DataLoader's, summed over its workers). TypeError before the seal, with a filter
        (the count is known only by reading), or when the server cannot say.

        The server is asked from a short-lived Python process, once per dataset: gRPC used in
        this process would hang the DataLoader workers it forks later (see docs/python.md)."""
        if self._length is None:
            workers = max(1, self.num_workers)
            requests = [self._shard(w, workers, start=0).message().SerializeToString()
                        for w in range(workers)]
            self._length = _batches_in_child(self.endpoint, self.token, self.tls, requests,
                                             self.batch_size, self.link)
        return self._length

    # --- iteration ----------------------------------------------------------------------------

    def _shard(self, worker: int, workers: int, start: int) -> ShardRequest:
        rank, world = _distributed_rank()
        rank = self.rank if self.rank is not None else rank
        world = self.world_size if self.world_size is not None else world
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}; check RANK and WORLD_SIZE")
        return ShardRequest(
            link=self.link, rank=rank * workers + worker, world_size=world * workers,
            epoch=self.epoch, seed=self.seed, batch_rows=self.batch_size, shuffle=self.shuffle,
            drop_last=self.drop_last, start_batch=start, streaming=self.streaming,
            columns=self.columns, filter=self.filter,
            batches_per_message=self.batches_per_message)

    def _request(self) -> ShardRequest:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        if self._worker_resume is not None and self._worker_resume[0] == epoch:
            # This worker's own count, restored by StatefulDataLoader.
            self._taken = self._worker_resume[1]
            return self._shard(worker, workers, start=self._taken)
        taken = int(self._shared[2]) if int(self._shared[1]) == epoch else 0
        self._taken = taken if info is None else 0
        # The DataLoader takes batches from its workers in turn, starting at worker 0. After
        # `taken` batches, the next one is due from slot `taken % workers`: that slot's reader
        # becomes worker 0, so a resumed epoch continues in the same order.
        slot = (worker + taken) % workers
        start = max(0, (taken - slot + workers - 1) // workers)
        return self._shard(slot, workers, start=start)

    def _epoch_done(self) -> None:
        # A resume skips batches in one epoch only, in every process that shares it.
        self._shared[1] = -1
        self._worker_resume = None

    def __iter__(self) -> Iterator[Any]:
        # The request is made now, not at the first batch: every worker reads the resume as it
        # starts, before any of them finishes and clears it.
        return self._consume(self._request())

    def _consume(self, request: ShardRequest) -> Iterator[Any]:
        items: "queue.Queue[Any]" = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        convert = self.transform or to_tensors
        thread = threading.Thread(target=self._produce, args=(request, convert, items, stop),
                                  name=f"handoff-prefetch-{request.rank}", daemon=True)
        thread.start()
        try:
            while True:
                item = items.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                for batch in item:
                    self._taken += 1
                    yield batch
            self._epoch_done()
        finally:
            stop.set()
            # The reader may be blocked handing over a batch: make room until it sees `stop`.
            while thread.is_alive():
                try:
                    while True:
                        items.get_nowait()
                except queue.Empty:
                    pass
                thread.join(timeout=0.05)

    def _open(self, client: HandoffClient, request: ShardRequest, stop: threading.Event):
        """The shard's stream and its first batch (None when it is empty), once the link exists:
        until then, within `wait_link`, ask again with a growing pause. None when stopped."""
        deadline = time.monotonic() + self.wait_link
        pause = 0.2
        while True:
            stream = client.read_shard(request)
            try:
                return next(stream, None), stream
            except LinkNotFound as e:
                stream.close()
                left = deadline - time.monotonic()
                if left <= 0:
                    if self.wait_link:
                        raise LinkNotFound(
                            f"{e} (waited {self.wait_link:g} s for it to be created; raise "
                            f"HANDOFF_WAIT_LINK or wait_link= to wait longer)",
                            code=e.code) from e
                    raise
                if stop.wait(min(pause, left)):
                    return None
                pause = min(pause * 2, 5.0)

    def _produce(self, request: ShardRequest, convert, items: "queue.Queue[Any]",
                 stop: threading.Event) -> None:
        def put(item) -> bool:
            # Bounded: at most `prefetch` batches wait for the training loop. A blocking put, not
            # a polling one: the consumer drains the queue when it stops, which frees it.
            if stop.is_set():
                return False
            items.put(item)
            return not stop.is_set()

        try:
            with HandoffClient(self.endpoint, self.token, tls=self.tls) as client:
                opened = self._open(client, request, stop)
                if opened is None:
                    return
                first, stream = opened
                rows = request.batch_rows
                try:
                    if first is not None and not put(_cut(first, rows, convert)):
                        return
                    for message in stream:
                        if not put(_cut(message, rows, convert)):
                            return
                finally:
                    stream.close()
            put(_END)
        except BaseException as e:  # handed to the training loop, which raises it
            put(e)
