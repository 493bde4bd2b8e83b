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
import queue
import threading
import time
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from .client import HandoffClient, LinkNotFound, ShardRequest, TlsSettings, resolve_link

# How long a reader waits for a link that does not exist yet: a DataLink with `gate: streaming`
# may start training a moment before the producer's first write.
DEFAULT_WAIT_LINK_SECONDS = 300

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


def column_to_tensor(column: pa.Array) -> Any:
    """A column as a tensor where it is numbers, as a list where it is not.

    Zero-copy for integer and float columns without nulls, and for (nested) fixed-size lists of
    them, which become 2-D (N-D) tensors; so are lists whose rows all have the same length (how
    Spark sends an embedding). Booleans and columns with nulls are copied (nulls become
    NaN, so integers with nulls become float64). Strings and other types become Python lists.
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
        lengths = pc.list_value_length(column)
        width = pc.min(lengths).as_py()
        if width == pc.max(lengths).as_py():
            inner = column_to_tensor(column.flatten())
            if isinstance(inner, torch.Tensor):
                return inner.reshape(len(column), width, *inner.shape[1:])
        return column.to_pylist()
    if _zero_copy_ok(column):
        return _dlpack(column)
    if pa.types.is_boolean(column.type) and column.null_count == 0:
        return torch.from_numpy(column.to_numpy(zero_copy_only=False))
    if (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
            or pa.types.is_boolean(column.type)):
        return torch.from_numpy(column.to_numpy(zero_copy_only=False))
    return column.to_pylist()


def to_tensors(batch: pa.RecordBatch) -> Dict[str, Any]:
    """A record batch as a dict of column name to tensor (or list, for strings and the like)."""
    return {name: column_to_tensor(column) for name, column in zip(batch.schema.names, batch.columns)}


def _distributed_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


_END = object()


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
        prefetch: batches read ahead of the training loop by a background thread.
        endpoint, token: default `HANDOFF_ENDPOINT` and `HANDOFF_TOKEN`.
        tls: CA and client certificate for a grpc+tls:// endpoint; default from HANDOFF_TLS_CA,
            HANDOFF_TLS_CA_PEM, HANDOFF_TLS_CLIENT_CERT and HANDOFF_TLS_CLIENT_KEY.
        wait_link: seconds to wait for a link that does not exist yet before failing with
            LinkNotFound; 0 fails at once. Default: $HANDOFF_WAIT_LINK, else 300.
    """

    def __init__(self, link: Optional[str] = None, batch_size: Optional[int] = None, *,
                 shuffle: Optional[bool] = None, seed: Optional[int] = None,
                 drop_last: bool = False,
                 streaming: bool = False, rank: Optional[int] = None,
                 world_size: Optional[int] = None,
                 transform: Optional[Callable[[pa.RecordBatch], Any]] = None,
                 prefetch: int = 2, endpoint: Optional[str] = None, token: Optional[str] = None,
                 columns: Optional[Sequence[str]] = None, filter: Optional[str] = None,
                 tls: Optional[TlsSettings] = None, wait_link: Optional[float] = None):
        super().__init__()
        if wait_link is None:
            wait_link = _env_int("HANDOFF_WAIT_LINK", DEFAULT_WAIT_LINK_SECONDS)
        if wait_link < 0:
            raise ValueError("wait_link is seconds to wait for the link to exist; 0 or more")
        self.wait_link = float(wait_link)
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
        self.epoch = 0
        # Batches the training loop took from this epoch, when iterated in this process.
        self._taken = 0
        self._resume: Optional[tuple[int, int]] = None

    # --- epochs and resuming ----------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for this epoch; every rank must call it with the same number."""
        if epoch != self.epoch:
            self._taken = 0
            self._resume = None
        self.epoch = epoch

    def state_dict(self, batches: Optional[int] = None) -> Dict[str, int]:
        """Where this epoch stands. With DataLoader workers the count of batches lives in the
        workers, so pass `batches`: how many the training loop took this epoch."""
        return {"epoch": self.epoch, "batches": self._taken if batches is None else batches}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Resume mid-epoch: the next iteration of that epoch yields exactly the remaining batches."""
        self.epoch = int(state["epoch"])
        self._taken = int(state["batches"])
        self._resume = (self.epoch, self._taken)

    # --- iteration ----------------------------------------------------------------------------

    def _request(self) -> ShardRequest:
        rank, world = _distributed_rank()
        rank = self.rank if self.rank is not None else rank
        world = self.world_size if self.world_size is not None else world
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}; check RANK and WORLD_SIZE")
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        taken = self._resume[1] if self._resume and self._resume[0] == self.epoch else 0
        # The DataLoader takes batches from its workers in turn, starting at worker 0. After
        # `taken` batches, the next one is due from slot `taken % workers`: that slot's reader
        # becomes worker 0, so a resumed epoch continues in the same order.
        slot = (worker + taken) % workers
        start = max(0, (taken - slot + workers - 1) // workers)
        return ShardRequest(
            link=self.link, rank=rank * workers + slot, world_size=world * workers,
            epoch=self.epoch, seed=self.seed, batch_rows=self.batch_size, shuffle=self.shuffle,
            drop_last=self.drop_last, start_batch=start, streaming=self.streaming,
            columns=self.columns, filter=self.filter)

    def __iter__(self) -> Iterator[Any]:
        request = self._request()
        in_main_process = get_worker_info() is None
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
                if in_main_process:
                    self._taken += 1
                yield item
            if in_main_process:
                self._resume = None
        finally:
            stop.set()
            thread.join(timeout=10)

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
            # Bounded: at most `prefetch` batches wait for the training loop.
            while not stop.is_set():
                try:
                    items.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            with HandoffClient(self.endpoint, self.token, tls=self.tls) as client:
                opened = self._open(client, request, stop)
                if opened is None:
                    return
                first, stream = opened
                try:
                    if first is not None and not put(convert(first)):
                        return
                    for batch in stream:
                        if not put(convert(batch)):
                            return
                finally:
                    stream.close()
            put(_END)
        except BaseException as e:  # handed to the training loop, which raises it
            put(e)
