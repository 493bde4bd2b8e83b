"""Kubeflow Pipelines components for DataLinks (needs the `kfp` package).

- `datalink`: apply a DataLink and wait for a phase (default `Finished`). Outputs `rows` (the
  link's row count) and `status` (its status as JSON). Fails the step, with the DataLink's
  message, if the link fails.
- `apply_manifest`: server-side apply one object, e.g. the suspended SparkApplication or
  PyTorchJob a DataLink names.

The steps run `handoff.k8s` in their container, so their image must have the handoff package
(with the kubernetes client): set `HANDOFF_KFP_IMAGE` to such an image when you compile the
pipeline, or `HANDOFF_KFP_PACKAGE` to a pip requirement (a wheel URL, your index's name) that
installs it into the default `python:3.11-slim`. The step's service account needs DataLinks
(and, for `apply_manifest`, the jobs) in its namespace: in a Kubeflow Profile, `default-editor`
has them through kubeflow-edit. See examples/kfp/pipeline.py.
"""

import os
from typing import NamedTuple

from kfp import dsl

IMAGE = os.environ.get("HANDOFF_KFP_IMAGE", "python:3.11-slim")
PACKAGES = [] if "HANDOFF_KFP_IMAGE" in os.environ else [
    os.environ.get("HANDOFF_KFP_PACKAGE", "handoff[k8s]")]


@dsl.component(base_image=IMAGE, packages_to_install=PACKAGES)
def datalink(manifest: str, phase: str = "Finished", namespace: str = "",
             timeout_seconds: int = 86400) -> NamedTuple("Outputs", [("rows", int),
                                                                      ("status", str)]):
    """Apply the DataLink in `manifest` (YAML or JSON) and wait until it reaches `phase`."""
    from collections import namedtuple

    from handoff.k8s import run_datalink_step
    rows, status = run_datalink_step(manifest, phase, namespace or None, timeout_seconds)
    return namedtuple("Outputs", ["rows", "status"])(rows, status)


@dsl.component(base_image=IMAGE, packages_to_install=PACKAGES)
def apply_manifest(manifest: str, namespace: str = "") -> str:
    """Server-side apply one object; returns its name."""
    from handoff.k8s import apply_object
    return apply_object(manifest, namespace or None)["metadata"]["name"]
