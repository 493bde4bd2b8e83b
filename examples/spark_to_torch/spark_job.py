"""The producer: a local Spark job builds a feature table and writes it through the handoff sink.

Endpoint, token and link come from HANDOFF_ENDPOINT, HANDOFF_TOKEN and HANDOFF_LINK, as the
DataLink controller sets them in a SparkApplication.
"""

import os
import sys
import time

import numpy as np
import pyarrow as pa
from pyspark.sql import SparkSession

ROWS = int(os.environ.get("DEMO_ROWS", "1000000"))
DIM = 16
SCHEMA = "id long, label int, embedding array<float>"
ARROW_SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("label", pa.int32()),
    ("embedding", pa.list_(pa.field("element", pa.float32()))),
])


def features(batches):
    """Feature rows for each batch of ids, built as Arrow columns: no row is a Python object."""
    for batch in batches:
        ids = batch.column(0).to_numpy()
        emb = np.sin(ids[:, None] * 0.001 + np.arange(DIM)[None, :]).astype(np.float32)
        label = (emb.sum(axis=1) > 0).astype(np.int32)
        offsets = pa.array(np.arange(0, (len(ids) + 1) * DIM, DIM, dtype=np.int32))
        embedding = pa.ListArray.from_arrays(offsets, pa.array(emb.reshape(-1)),
                                             type=ARROW_SCHEMA.field("embedding").type)
        yield pa.RecordBatch.from_arrays([pa.array(ids), pa.array(label), embedding],
                                         schema=ARROW_SCHEMA)


def main():
    spark = (SparkSession.builder.master("local[2]").appName("handoff-demo")
             .config("spark.driver.host", "127.0.0.1")
             .config("spark.driver.bindAddress", "127.0.0.1")
             .config("spark.ui.enabled", "false")
             .config("spark.sql.shuffle.partitions", "4")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    table = spark.range(ROWS, numPartitions=8).mapInArrow(features, SCHEMA)
    started = time.monotonic()
    table.write.format("handoff").mode("append").save()
    seconds = time.monotonic() - started
    print(f"spark: wrote {ROWS:,} rows to link '{os.environ['HANDOFF_LINK']}' in {seconds:.1f} s "
          f"({ROWS / seconds:,.0f} rows/s), 8 partitions, exactly once, sealed", flush=True)
    spark.stop()


if __name__ == "__main__":
    sys.exit(main())
