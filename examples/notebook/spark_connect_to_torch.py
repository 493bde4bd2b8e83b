"""From a Spark Connect client (a notebook, say) into a Handoff link, then into torch.

Cells (`# %%`) run top to bottom in a notebook, or all at once as a script. It needs a running
`handoff serve` and, for a remote Spark, a Spark Connect server whose Python has the `handoff`
package (docs/python.md, "Spark Connect"):

    export HANDOFF_WRITER_TOKEN=$(openssl rand -hex 16) HANDOFF_READER_TOKEN=$(openssl rand -hex 16)
    handoff serve --listen 127.0.0.1:8815 &      # reads both tokens from the environment
    export HANDOFF_ENDPOINT=grpc://127.0.0.1:8815
    python3 examples/notebook/spark_connect_to_torch.py                            # local[2]
    SPARK_REMOTE=sc://spark-connect:15002 python3 examples/notebook/spark_connect_to_torch.py

Without SPARK_REMOTE, `remote("local[2]")` starts a Connect server inside this process (Java 17
in JAVA_HOME; SPARK_LOCAL_IP=127.0.0.1 keeps it on loopback); `pip install "pyspark[connect]"`
brings the client's gRPC packages. The HANDOFF_*
variables here are this client's; the sink runs in the Connect server, which does not see them,
so the cell that writes passes every setting as an option.
"""

# %% Settings: this client's environment, handed to Spark explicitly as options.
import os
import time

import handoff
from handoff.spark import register

endpoint = os.environ.get("HANDOFF_ENDPOINT", handoff.DEFAULT_ENDPOINT)
writer_token = os.environ.get("HANDOFF_WRITER_TOKEN") or os.environ.get("HANDOFF_TOKEN", "")
reader_token = os.environ.get("HANDOFF_READER_TOKEN") or os.environ.get("HANDOFF_TOKEN", "")
link = os.environ.get("HANDOFF_LINK") or f"notebook/features-{int(time.time())}"
rows = int(os.environ.get("DEMO_ROWS", "100000"))

sink_options = {"link": link, "endpoint": endpoint, "token": writer_token}
if os.environ.get("HANDOFF_TLS_CA"):  # a file here, on the client: ship the PEM itself
    with open(os.environ["HANDOFF_TLS_CA"]) as f:
        sink_options["tls_ca_pem"] = f.read()

# %% A Spark Connect session; `register` makes `handoff` known to its server-side session.
from pyspark.sql import SparkSession  # noqa: E402

remote = os.environ.get("SPARK_REMOTE", "local[2]")
spark = SparkSession.builder.remote(remote).getOrCreate()
register(spark)  # not needed when the server has `handoff` installed; harmless then
print(f"Spark Connect {spark.version} at {remote}; writing {rows} rows into {link!r} at {endpoint}")

# %% Features: an id, an 8-float embedding and a label, computed on the server.
features = spark.range(0, rows, numPartitions=4).selectExpr(
    "id",
    "transform(sequence(0, 7), k -> CAST(sin(id + k) AS FLOAT)) AS embedding",
    "CAST(id % 2 AS FLOAT) AS label")

started = time.monotonic()
writer = features.write.format("handoff").mode("append")
for key, value in sink_options.items():
    writer = writer.option(key, value)
writer.save()  # the Connect server's driver commits the winning task attempts, then seals
print(f"written and sealed in {time.monotonic() - started:.1f} s")

# %% Read the link back as torch batches and train a linear model for one epoch.
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from handoff.torch import HandoffDataset  # noqa: E402

dataset = HandoffDataset(link, batch_size=4096, shuffle=True, endpoint=endpoint,
                         token=reader_token, rank=0, world_size=1, wait_link=0)
model = torch.nn.Linear(8, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
seen = []
for batch in DataLoader(dataset, batch_size=None):
    prediction = model(batch["embedding"]).squeeze(1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(prediction, batch["label"])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    seen.append(batch["id"])
ids = torch.cat(seen)
# Without drop_last the last batch is filled up by wrapping around to the epoch's first rows.
assert torch.equal(ids.unique(), torch.arange(rows)), "the epoch missed rows"
assert ids.numel() == len(seen) * 4096 < rows + 4096
print(f"one epoch: {len(seen)} batches, every one of the {rows} rows "
      f"(+{ids.numel() - rows} to fill the last batch); loss {loss.item():.4f}")

# %%
spark.stop()
