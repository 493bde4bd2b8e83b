"""A DataLink from a notebook: create it with the Python API, follow its status, clean up.

Cells (`# %%`) run top to bottom in a notebook, or all at once as a script, against the cluster
in KUBECONFIG (or the pod's own, in a Kubeflow notebook). The DataLink pairs a SparkApplication
with a PyTorchJob that you create next to it (examples/k8s has both); the controller starts the
link's server, wires both jobs to it and releases training once the data is sealed.

    DATALINK_NAMESPACE=team-a DATALINK_PHASE=Finished python3 examples/notebook/datalink.py

`bash examples/notebook/run.sh` runs it on this machine against a test API server with the real
controller. No pods run there (no kubelet), so it waits for Provisioning, the phase in which the
controller has made the link's Secret, Deployment and Service, and shows those objects.

Settings: DATALINK_NAMESPACE (default: the kubeconfig context's), DATALINK_NAME (features),
SPARK_APPLICATION (prep), PYTORCH_JOB (train), DATALINK_PHASE (Finished), DATALINK_TIMEOUT
(seconds, 3600), DATALINK_KEEP=1 keeps the link at the end.
"""

# %% A client for DataLinks in one namespace.
import os

from handoff.k8s import DataLinkClient

links = DataLinkClient(namespace=os.environ.get("DATALINK_NAMESPACE") or None)
name = os.environ.get("DATALINK_NAME", "features")
phase = os.environ.get("DATALINK_PHASE", "Finished")
print(f"DataLinks in namespace {links.namespace}: {[s.name for s in links.list()]}")

# %% Create the link: Spark writes it, torch reads it in shuffled batches of 1024 rows.
created = links.create(
    name,
    spark_application=os.environ.get("SPARK_APPLICATION", "prep"),
    pytorch_job=os.environ.get("PYTORCH_JOB", "train"),
    read={"batchRows": 1024, "shuffle": True},
    server={"memory": "2Gi"},
)
print(f"created DataLink {created.namespace}/{created.name}")

# %% Follow it: one line per change of phase or rows (on stderr), until the phase is reached.
status = links.wait_for(name, phase, timeout=float(os.environ.get("DATALINK_TIMEOUT", "3600")),
                        interval=1.0)
print(f"{status.name} reached {status.phase}; server endpoint {status.endpoint}")
for condition in status.conditions:
    print(f"  {condition.type}={condition.status} {condition.reason}: {condition.message}")
if status.rows is not None:
    print(f"  rows {status.rows}, bytes {status.bytes}, memory used {status.memory_used}")

# %% What the controller made for the link's server (the kubernetes client comes with handoff[k8s]).
from kubernetes import client as k8s  # noqa: E402

apps = k8s.AppsV1Api(links._api_client)
core = k8s.CoreV1Api(links._api_client)
selector = (f"app.kubernetes.io/instance={name}-handoff,"
            "app.kubernetes.io/managed-by=handoff-controller")
for kind, listed in (("Deployment", apps.list_namespaced_deployment),
                     ("Service", core.list_namespaced_service),
                     ("Secret", core.list_namespaced_secret)):
    found = [o.metadata.name for o in listed(links.namespace, label_selector=selector).items]
    print(f"  {kind}: {', '.join(found) or '-'}")

# %% Clean up: deleting the DataLink removes its server and data (the jobs stay).
if os.environ.get("DATALINK_KEEP") != "1":
    links.delete(name)
    print(f"deleted {name}; the controller removes its server")
