"""Handoff: Spark writes Arrow record batches into a Handoff server; torch ranks read their shards.

- `handoff.HandoffClient`: the Flight client (commands, two-phase commit, shard reads).
- `handoff.spark`: the `handoff` Spark data source (`df.write.format("handoff")`) and `write()`.
- `handoff.torch`: `HandoffDataset`, an `IterableDataset` of one rank's shard.
- `handoff.k8s`: `DataLinkClient`, DataLinks from Python.
- `handoff.server`: the `handoff` binary installed with this package, and `LocalServer`.

Endpoint, token and link fall back to `HANDOFF_ENDPOINT`, `HANDOFF_TOKEN` and `HANDOFF_LINK`,
the variables the DataLink controller injects into Spark and training pods. A `grpc+tls://`
endpoint trusts the CA in `HANDOFF_TLS_CA` (a file) or `HANDOFF_TLS_CA_PEM` (`handoff.TlsSettings`).
"""

from .client import (
    DEFAULT_ENDPOINT,
    HandoffClient,
    HandoffError,
    LinkNotFound,
    ServerUnavailable,
    TlsSettings,
    resolve_link,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ENDPOINT",
    "HandoffClient",
    "HandoffError",
    "LinkNotFound",
    "ServerUnavailable",
    "TlsSettings",
    "resolve_link",
    "__version__",
]
