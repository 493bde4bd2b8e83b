"""A Kubeflow Pipeline with the DataLink as a step: the producer and the consumer are applied
suspended (examples/k8s), then the DataLink step wires them, releases training at the seal and
waits until training finished, returning the link's row count.

    python examples/kfp/pipeline.py spark_to_torch.yaml      # compile; upload in the KFP UI

Set HANDOFF_KFP_IMAGE (an image with the handoff package) or HANDOFF_KFP_PACKAGE (a pip
requirement that installs it) before compiling; see handoff/kfp.py.
"""

import sys
from pathlib import Path

from kfp import compiler, dsl

from handoff.kfp import apply_manifest, datalink

MANIFESTS = Path(__file__).resolve().parent.parent / "k8s"


def manifest(name: str) -> str:
    return (MANIFESTS / name).read_text()


@dsl.pipeline(name="spark-to-torch",
              description="Spark prepares features; torch trains on them through a DataLink.")
def spark_to_torch(namespace: str = "", phase: str = "Finished") -> int:
    producer = apply_manifest(manifest=manifest("sparkapplication.yaml"), namespace=namespace)
    producer.set_display_name("producer: SparkApplication (suspended)")
    consumer = apply_manifest(manifest=manifest("pytorchjob.yaml"), namespace=namespace)
    consumer.set_display_name("consumer: PyTorchJob (suspended)")
    link = datalink(manifest=manifest("datalink.yaml"), namespace=namespace, phase=phase)
    link.set_display_name("DataLink: wire, gate on the seal, wait")
    link.after(producer, consumer)
    return link.outputs["rows"]


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "spark_to_torch.yaml"
    compiler.Compiler().compile(spark_to_torch, out)
    print(f"wrote {out}")
