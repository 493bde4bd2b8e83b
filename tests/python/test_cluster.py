"""The whole loop in pods, on a real single-node Kubernetes (issue 16).

`scripts/kube-node.sh` starts etcd, the API server, the controller manager, the scheduler,
kube-proxy, containerd and the kubelet on this machine; `scripts/images.sh` builds the project's
image from the test binary and imports it (no registry). The controller is applied from
deploy/base with kustomize and runs as a pod under its ServiceAccount and RBAC. Each link's server
runs as the pod the controller's Deployment describes (probes, security context, memory limit)
and is reached through its Service.

Test doubles, said plainly:
- The Spark Operator and the Training Operator cannot be installed here. `Operators` plays their
  part: for an unsuspended SparkApplication it starts a driver pod with the env from
  `spec.driver.env`, for an unsuspended PyTorchJob one pod per replica with RANK, WORLD_SIZE,
  MASTER_ADDR and the template's env, and it sets the jobs' status from the pods' phases.
- No registry: those pods run `handoff.local/host:e2e`, an empty image, and mount this machine's
  /usr (the JDK included), its Python and the checkout's python/ read-only by hostPath. The Spark
  job is real PySpark (local[2]) writing through the project's sink; the readers are real torch
  with HandoffDataset.
- Debian has no CoreDNS: scripts/kube-node.sh runs dnsmasq on the node's bridge as the cluster
  DNS, answering each Service's name with its ClusterIP and each StatefulSet pod's name under its
  headless Service with the pod's IP, from the API (what CoreDNS answers for those names).

A node that cannot start fails these tests with the reason; they never skip.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client as k8s  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402

from conftest import REPO, eventually, handoff_bin, patience  # noqa: E402

UPSTREAM = REPO / "crates" / "handoff-controller" / "tests" / "fixtures" / "upstream"
IMAGE = "handoff.local/handoff:e2e"
HOST_IMAGE = "handoff.local/host:e2e"
SPARK = ("sparkoperator.k8s.io", "v1beta2", "sparkapplications")
PYTORCH = ("kubeflow.org", "v1", "pytorchjobs")
LINKS = ("handoff.kubeflow.org", "v1alpha1", "datalinks")
JAVA_HOME = os.environ.get("JAVA_HOME", "/usr/lib/jvm/java-17-openjdk-amd64")


def run(*args, timeout=600.0, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=patience(timeout), **kwargs)


def for_api_server_1_20(node):
    """Another project's CRD as the 1.20 API server takes it (as the Rust tests adjust it):
    CEL rules arrived in 1.23 (crates/handoff-controller/tests/crd_rules.rs checks our writes
    against them), and 1.20 refuses empty-string defaults and optional list-map keys."""
    if isinstance(node, dict):
        node.pop("x-kubernetes-validations", None)
        if node.get("default") == "":
            node.pop("default")
        if node.get("x-kubernetes-list-type") == "map":
            node["x-kubernetes-list-type"] = "atomic"
            node.pop("x-kubernetes-list-map-keys", None)
        for value in node.values():
            for_api_server_1_20(value)
    elif isinstance(node, list):
        for value in node:
            for_api_server_1_20(value)


@dataclass
class Node:
    api: object  # kubernetes ApiClient
    kubeconfig: str
    work: Path
    image: str = IMAGE
    # None: job pods run HOST_IMAGE with this machine's Python and JDK mounted (the local node);
    # else an image with Python, a JDK, pyspark, torch and the handoff package (any cluster).
    job_image: str | None = None
    namespace_suffix: str = ""

    @property
    def core(self):
        return k8s.CoreV1Api(self.api)

    @property
    def custom(self):
        return k8s.CustomObjectsApi(self.api)

    @property
    def apps(self):
        return k8s.AppsV1Api(self.api)

    def kubectl(self, *args, stdin=None):
        done = run("kubectl", "--kubeconfig", self.kubeconfig, *args, input=stdin)
        assert done.returncode == 0, f"kubectl {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout


def apply_controller(node: Node):
    """deploy/base through kustomize, with the image built here: as an operator would apply it,
    with an overlay that names their image."""
    overlay = node.work / "overlay"
    overlay.mkdir()
    image_name, image_tag = node.image.rsplit(":", 1)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(REPO / "deploy" / "base", overlay)],
        "images": [{"name": "ghcr.io/handoff-dev/handoff", "newName": image_name,
                    "newTag": image_tag}],
        "patches": [{
            "target": {"kind": "Deployment", "name": "handoff-controller"},
            "patch": yaml.safe_dump([
                {"op": "replace", "path": "/spec/template/spec/containers/0/args/1",
                 "value": f"--server-image={node.image}"},
                {"op": "replace", "path": "/spec/template/spec/containers/0/args/3",
                 "value": "--poll-interval=1s"},
            ] + ([{"op": "replace", "path": "/spec/template/spec/containers/0/imagePullPolicy",
                   "value": "Never"}] if node.job_image is None else [])),
        }],
    }))
    manifests = node.kubectl("kustomize", overlay)
    assert f"image: {node.image}" in manifests and f"--server-image={node.image}" in manifests, \
        manifests
    node.kubectl("apply", "-f", "-", stdin=manifests)

    def available():
        got = node.apps.read_namespaced_deployment("handoff-controller", "handoff-system")
        return (got.status.available_replicas or 0) >= 1
    try:
        eventually("the controller's pod is available", available, timeout=180, interval=1)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{describe(node, 'handoff-system')}") from None


def install_crds(node: Node):
    extensions = k8s.ApiextensionsV1Api(node.api)
    crds = [yaml.safe_load(run(handoff_bin(), "crd", check=True).stdout)]
    for name in ["sparkoperator.k8s.io_sparkapplications.yaml", "kubeflow.org_pytorchjobs.yaml"]:
        crd = yaml.safe_load((UPSTREAM / name).read_text())
        if node.job_image is None:
            for_api_server_1_20(crd)
        crds.append(crd)
    for crd in crds:
        try:
            extensions.create_custom_resource_definition(crd)
        except ApiException as e:
            if e.status != 409:  # a shared cluster may have them already
                raise
    for crd in crds:
        def established(name=crd["metadata"]["name"]):
            got = extensions.read_custom_resource_definition(name)
            return any(c.type == "Established" and c.status == "True"
                       for c in got.status.conditions or [])
        eventually(f"CRD {crd['metadata']['name']} is established", established, timeout=60)


def describe(node: Node, namespace: str) -> str:
    """What went wrong, for a failure message: the pods, their states and their last log lines."""
    lines = []
    try:
        for pod in node.core.list_namespaced_pod(namespace).items:
            states = [(s.name, s.restart_count, s.state.to_dict() if s.state else None,
                       s.last_state.to_dict() if s.last_state else None)
                      for s in pod.status.container_statuses or []]
            lines.append(f"pod {pod.metadata.name}: {pod.status.phase} {states}")
            try:
                log = node.core.read_namespaced_pod_log(pod.metadata.name, namespace,
                                                        tail_lines=25)
                lines.extend(f"    {line}" for line in log.splitlines())
            except ApiException as e:
                lines.append(f"    (no log: {e.reason})")
        for event in node.core.list_namespaced_event(namespace).items[-30:]:
            lines.append(f"event {event.involved_object.kind}/{event.involved_object.name}: "
                         f"{event.reason}: {event.message}")
    except Exception as e:  # a failure report must not hide the failure
        lines.append(f"(describe failed: {e})")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def node():
    """The local single-node cluster, or with HANDOFF_TEST_KUBECONFIG any cluster, given
    HANDOFF_TEST_IMAGE (the handoff image, pushed where it pulls from) and HANDOFF_TEST_JOB_IMAGE
    (Python with a JDK, pyspark, torch and the handoff package) (docs/controller.md)."""
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl (with its built-in kustomize, v4 or later) is needed to apply "
                    "deploy/base as an operator would; install it", pytrace=False)
    kubeconfig = os.environ.get("HANDOFF_TEST_KUBECONFIG")
    if kubeconfig:
        missing = [v for v in ("HANDOFF_TEST_IMAGE", "HANDOFF_TEST_JOB_IMAGE")
                   if not os.environ.get(v)]
        assert not missing, f"HANDOFF_TEST_KUBECONFIG is set: set {' and '.join(missing)} too"
        with tempfile.TemporaryDirectory(prefix="handoff-cluster-") as work:
            n = Node(kubernetes.config.new_client_from_config(config_file=kubeconfig),
                     kubeconfig, Path(work), os.environ["HANDOFF_TEST_IMAGE"],
                     os.environ["HANDOFF_TEST_JOB_IMAGE"], f"-{int(time.time()):x}")
            install_crds(n)
            apply_controller(n)
            yield n
        return

    work = Path(tempfile.mkdtemp(prefix="handoff-node-"))
    script = REPO / "scripts" / "kube-node.sh"
    up = run("bash", script, work, timeout=2400)
    if up.returncode != 0:
        run("bash", script, "--down", work)
        pytest.fail(f"the single-node cluster did not start (scripts/kube-node.sh):\n"
                    f"{up.stderr[-6000:]}", pytrace=False)
    try:
        env = dict(line.split("=", 1) for line in (work / "env").read_text().split())
        images = run("bash", REPO / "scripts" / "images.sh", "--binary", handoff_bin(),
                     "--containerd-socket", env["CONTAINERD_SOCKET"])
        assert images.returncode == 0, f"scripts/images.sh failed:\n{images.stderr}"
        kubeconfig = str(work / "kubeconfig")
        n = Node(kubernetes.config.new_client_from_config(config_file=kubeconfig), kubeconfig,
                 work)
        install_crds(n)
        apply_controller(n)
        yield n
    finally:
        down = run("bash", script, "--down", work)
        # A node left behind would block the next start; its logs stay in `work` to read.
        assert down.returncode == 0, f"scripts/kube-node.sh --down {work} failed:\n{down.stderr}"
        shutil.rmtree(work, ignore_errors=True)


# --- the operators' part ------------------------------------------------------------------------

SPARK_JOB = r"""
import os, sys, time
from pyspark.sql import SparkSession
rows, dim = int(os.environ["E2E_ROWS"]), int(os.environ["E2E_DIM"])
spark = (SparkSession.builder.master("local[2]").appName("e2e")
         .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
         .config("spark.ui.enabled", "false").getOrCreate())
spark.sparkContext.setLogLevel("WARN")
table = spark.range(rows, numPartitions=4).selectExpr(
    "id", f"transform(sequence(1, {dim}), i -> cast(id * i as float)) as embedding")
table.write.format("handoff").mode("append").save()
print(f"wrote {rows} rows", flush=True)
spark.stop()
"""

READER = r"""
import base64, json, os, sys, time, zlib
from handoff.torch import HandoffDataset
ids, sizes = [], []
columns = os.environ.get("E2E_COLUMNS", "id").split(",")
for batch in HandoffDataset(columns=columns):
    column = batch["id"] if isinstance(batch, dict) else batch[0]
    ids.extend(int(v) for v in column.tolist())
    sizes.append(len(column))
    print(f"E2E-PROGRESS {len(sizes)}", flush=True)
    time.sleep(float(os.environ.get("E2E_BATCH_PAUSE", "0")))
# The result travels in the pod's log, so the test reads it on any cluster: compressed, in lines
# short enough that no runtime splits them.
payload = base64.b64encode(zlib.compress(json.dumps({"ids": ids, "sizes": sizes}).encode()))
for i in range(0, len(payload), 4000):
    print("E2E-RESULT " + payload[i:i + 4000].decode(), flush=True)
print(f"E2E-END rank {os.environ['RANK']}: {len(ids)} rows in {len(sizes)} batches", flush=True)
"""


def pod_log(node, namespace: str, name: str) -> str:
    try:
        return node.core.read_namespaced_pod_log(name, namespace)
    except ApiException:
        return ""


def reader_progress(node, namespace: str, name: str) -> int:
    marks = [line for line in pod_log(node, namespace, name).splitlines()
             if line.startswith("E2E-PROGRESS ")]
    return int(marks[-1].split()[1]) if marks else 0


class Operators:
    """Plays the Spark Operator and the Training Operator (they cannot be installed here): pods
    for unsuspended jobs, and the jobs' status from those pods."""

    def __init__(self, node: Node, namespace: str):
        self.node = node
        self.namespace = namespace
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=patience(30))
        if self.error is not None and exc[0] is None:
            raise AssertionError(f"the operators' stand-in failed: {self.error!r}")

    def _loop(self):
        while not self.stop.wait(1.0):
            try:
                self._spark()
                self._pytorch()
            except ApiException as e:
                if e.status not in (404, 409):  # objects come and go while the test runs
                    self.error = e
                    return
            except Exception as e:  # noqa: BLE001 - reported by __exit__
                self.error = e
                return

    def _jobs(self, kind):
        group, version, plural = kind
        return self.node.custom.list_namespaced_custom_object(
            group, version, self.namespace, plural)["items"]

    def _pods(self, selector):
        return self.node.core.list_namespaced_pod(self.namespace,
                                                  label_selector=selector).items

    def _pod(self, name, owner, labels, script, env):
        container = {"name": "main", "command": ["python3", "-c", script], "env": list(env)}
        spec = {"restartPolicy": "Never", "containers": [container]}
        if self.node.job_image is not None:
            container["image"] = self.node.job_image
        else:
            # This machine's Python, JDK and checkout, read-only: no registry, no image to build.
            python_dirs = sorted({p for p in (sys.base_prefix, sys.prefix)
                                  if not p.startswith("/usr/")})
            mounts = [("usr", "/usr"), ("python-package", str(REPO / "python"))]
            mounts += [(f"python-{i}", p) for i, p in enumerate(python_dirs)]
            if Path("/etc/java-17-openjdk").is_dir():  # the JDK's conf/ links there
                mounts.append(("java-conf", "/etc/java-17-openjdk"))
            container.update({
                "image": HOST_IMAGE, "imagePullPolicy": "Never",
                "command": [sys.executable, "-c", script],
                "volumeMounts": [{"name": n, "mountPath": p, "readOnly": True}
                                 for n, p in mounts] + [{"name": "tmp", "mountPath": "/tmp"}],
            })
            container["env"] += [
                {"name": "PYTHONPATH", "value": str(REPO / "python")},
                {"name": "JAVA_HOME", "value": JAVA_HOME},
                {"name": "HOME", "value": "/tmp"},
                {"name": "PATH", "value": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
                {"name": "PYSPARK_PYTHON", "value": sys.executable},
            ]
            spec["volumes"] = [{"name": n, "hostPath": {"path": p}} for n, p in mounts] + [
                {"name": "tmp", "emptyDir": {}}]
        metadata = {"name": name, "labels": labels}
        if owner is not None:
            metadata["ownerReferences"] = [{
                "apiVersion": owner["apiVersion"], "kind": owner["kind"],
                "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
                "controller": True, "blockOwnerDeletion": False}]
        return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}

    def _spark(self):
        group, version, plural = SPARK
        for app in self._jobs(SPARK):
            name = app["metadata"]["name"]
            if app["spec"].get("suspend", False):
                continue
            pods = self._pods(f"e2e-spark={name}")
            if not pods:
                env = app["spec"].get("driver", {}).get("env", [])
                # Each run's driver is a new pod, as the operator's are.
                run_id = int(time.time() * 1000) % 1_000_000
                self.node.core.create_namespaced_pod(self.namespace, self._pod(
                    f"{name}-driver-{run_id}", app, {"e2e-spark": name}, SPARK_JOB, env))
                state = "SUBMITTED"
            else:
                phase = pods[0].status.phase
                state = {"Pending": "SUBMITTED", "Running": "RUNNING", "Succeeded": "COMPLETED",
                         "Failed": "FAILED"}.get(phase, "UNKNOWN")
            current = app.get("status", {}).get("applicationState", {}).get("state")
            if current != state:
                status = {"applicationState": {"state": state}, "driverInfo": {}}
                if state == "FAILED":
                    status["applicationState"]["errorMessage"] = "driver pod failed"
                self.node.custom.patch_namespaced_custom_object_status(
                    group, version, self.namespace, plural, name, {"status": status})

    def _pytorch(self):
        group, version, plural = PYTORCH
        for job in self._jobs(PYTORCH):
            name = job["metadata"]["name"]
            if job["spec"].get("runPolicy", {}).get("suspend", False):
                continue
            replicas = job["spec"]["pytorchReplicaSpecs"]
            world = sum(spec.get("replicas", 1) for spec in replicas.values())
            pods = self._pods(f"e2e-pytorch={name}")
            if not pods:
                ranks = [("Master", 0)] + [("Worker", i) for i in
                                           range(replicas.get("Worker", {}).get("replicas", 0))]
                for rank, (role, index) in enumerate(ranks):
                    template = replicas[role]["template"]["spec"]["containers"][0]
                    env = list(template.get("env", [])) + [
                        {"name": "RANK", "value": str(rank)},
                        {"name": "WORLD_SIZE", "value": str(world)},
                        {"name": "MASTER_ADDR", "value": "127.0.0.1"},
                    ]
                    self.node.core.create_namespaced_pod(self.namespace, self._pod(
                        f"{name}-{role.lower()}-{index}", job, {"e2e-pytorch": name},
                        READER, env))
                continue
            phases = [p.status.phase for p in pods]
            if "Failed" in phases:
                kind = "Failed"
            elif all(p == "Succeeded" for p in phases):
                kind = "Succeeded"
            elif all(p in ("Running", "Succeeded") for p in phases):
                kind = "Running"
            else:
                continue
            conditions = job.get("status", {}).get("conditions", [])
            if conditions and conditions[-1]["type"] == kind:
                continue
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            # The operator reports Running before an end, however quick the pods were.
            kinds = [kind] if kind == "Running" or any(
                c["type"] == "Running" for c in conditions) else ["Running", kind]
            conditions = conditions + [
                {"type": k, "status": "True", "reason": f"PyTorchJob{k}",
                 "message": f"stand-in: pods are {phases}", "lastTransitionTime": now,
                 "lastUpdateTime": now} for k in kinds]
            self.node.custom.patch_namespaced_custom_object_status(
                group, version, self.namespace, plural, name,
                {"status": {"conditions": conditions, "replicaStatuses": {}}})


# --- scenarios ----------------------------------------------------------------------------------

def create_namespace(node: Node, namespace: str):
    """A namespace, once pods can be made in it: on 1.20 the controller manager gives its
    `default` ServiceAccount a token first, and a pod created before is refused (500)."""
    node.core.create_namespace({"metadata": {"name": namespace}})

    def token():
        try:
            return node.core.read_namespaced_service_account("default", namespace).secrets
        except ApiException as e:
            if e.status == 404:  # the ServiceAccount itself comes a moment later
                return None
            raise
    eventually(f"namespace {namespace}'s default ServiceAccount has its token", token,
               timeout=60, interval=0.2)


def create_scenario(node: Node, namespace: str, link_spec: dict, *, rows: int, dim: int,
                    workers: int, batch_pause: float = 0.0, columns: str = "id"):
    """A namespace with a DataLink `features`, its suspended SparkApplication `prep` (E2E_ROWS
    rows of `dim` floats) and its suspended PyTorchJob `train` (1 master + `workers` workers)."""
    create_namespace(node, namespace)
    spark = yaml.safe_load((UPSTREAM / "examples" / "spark-pi.yaml").read_text())
    spark["metadata"] = {"name": "prep", "namespace": namespace}
    spark["spec"]["suspend"] = True
    spark["spec"]["driver"]["env"] = [{"name": "E2E_ROWS", "value": str(rows)},
                                      {"name": "E2E_DIM", "value": str(dim)}]
    job = yaml.safe_load((UPSTREAM / "examples" / "pytorchjob-simple.yaml").read_text())
    job["metadata"] = {"name": "train", "namespace": namespace}
    job["spec"]["runPolicy"] = {"suspend": True}
    roles = job["spec"]["pytorchReplicaSpecs"]
    roles["Worker"]["replicas"] = workers
    for role in roles.values():
        role["template"]["spec"]["containers"][0]["env"] = [
            {"name": "E2E_BATCH_PAUSE", "value": str(batch_pause)},
            {"name": "E2E_COLUMNS", "value": columns}]
    # The node has 2 CPUs: a quarter each, so that a server replaced or left by an earlier
    # scenario never keeps the next one from scheduling.
    link_spec = {**link_spec, "server": {"cpu": "250m", **link_spec.get("server", {})}}
    link = {"apiVersion": "handoff.kubeflow.org/v1alpha1", "kind": "DataLink",
            "metadata": {"name": "features", "namespace": namespace},
            "spec": {"producer": {"sparkApplication": "prep"},
                     "consumer": {"pytorchJob": "train"}, **link_spec}}
    for (group, version, plural), body in [(SPARK, spark), (PYTORCH, job), (LINKS, link)]:
        node.custom.create_namespaced_custom_object(group, version, namespace, plural, body)


@pytest.fixture()
def scenario(node):
    """create_scenario, and the namespace deleted after the test (with all it holds)."""
    made = []

    def create(namespace, *args, **kwargs):
        made.append(namespace)
        create_scenario(node, namespace, *args, **kwargs)
    yield create
    for namespace in made:
        try:
            node.core.delete_namespace(namespace)
        except ApiException:
            pass


def link_status(node: Node, namespace: str) -> dict:
    group, version, plural = LINKS
    return node.custom.get_namespaced_custom_object(
        group, version, namespace, plural, "features").get("status", {})


def wait_phase(node: Node, namespace: str, phases, timeout=600.0) -> dict:
    phases = {phases} if isinstance(phases, str) else set(phases)

    def reached():
        status = link_status(node, namespace)
        if status.get("phase") in phases:
            return status
        if status.get("phase") == "Failed" and "Failed" not in phases:
            raise AssertionError(f"the DataLink failed: {status}\n{describe(node, namespace)}")
        return None
    try:
        return eventually(f"the DataLink reaches {sorted(phases)}", reached, timeout=timeout,
                          interval=1)
    except AssertionError as e:
        if "DataLink failed" in str(e):
            raise
        raise AssertionError(f"{e}\nstatus: {link_status(node, namespace)}\n"
                             f"{describe(node, namespace)}") from None


def server_pods(node: Node, namespace: str):
    return node.core.list_namespaced_pod(
        namespace, label_selector="app.kubernetes.io/instance=features-handoff").items


def reader_pods(world: int):
    return ["train-master-0"] + [f"train-worker-{i}" for i in range(world - 1)]


def read_results(node: Node, namespace: str, world: int):
    shards = []
    for name in reader_pods(world):
        log = pod_log(node, namespace, name).splitlines()
        assert any(line.startswith("E2E-END") for line in log), \
            f"{name} reported no result\n{describe(node, namespace)}"
        payload = "".join(line.split(" ", 1)[1] for line in log
                          if line.startswith("E2E-RESULT "))
        shards.append(json.loads(zlib.decompress(base64.b64decode(payload))))
    return shards


def check_exactly_once(shards, rows: int, batch_rows: int):
    seen = [i for shard in shards for i in shard["ids"]]
    assert len(seen) == rows and set(seen) == set(range(rows)), \
        f"{len(seen)} ids read, {len(set(seen))} distinct, of {rows}"
    counts = {len(shard["sizes"]) for shard in shards}
    assert len(counts) == 1, f"unequal batch counts across ranks: {counts}"
    assert all(size == batch_rows for shard in shards for size in shard["sizes"])


def gone(what, read):
    def check():
        try:
            read()
        except ApiException as e:
            return e.status == 404
        return False
    eventually(f"{what} is gone", check, timeout=120, interval=1)


def test_the_happy_path_in_pods_through_ttl_cleanup(node, scenario):
    ns, rows, batch_rows, world = "happy" + node.namespace_suffix, 12_288, 256, 3
    scenario(ns, {"read": {"batchRows": batch_rows, "shuffle": True, "seed": 5},
                               "server": {"memory": "64Mi"},
                               "policy": {"ttlSecondsAfterFinished": 15}},
                    rows=rows, dim=8, workers=world - 1)
    with Operators(node, ns):
        status = wait_phase(node, ns, ["Sealed", "Consuming", "Finished"])
        # The server is the pod the controller's Deployment describes, ready behind its Service.
        [pod] = server_pods(node, ns)
        container = pod.spec.containers[0]
        assert container.image == IMAGE
        assert container.readiness_probe.http_get.path == "/readyz"
        assert container.liveness_probe.http_get.path == "/healthz"
        assert container.security_context.read_only_root_filesystem is True
        assert container.resources.limits["memory"], container.resources
        assert pod.spec.security_context.run_as_non_root is True
        assert all(s.ready for s in pod.status.container_statuses)
        status = wait_phase(node, ns, "Finished")
    # Read before the TTL below deletes it: the one server pod never restarted.
    assert [p.status.container_statuses[0].restart_count for p in server_pods(node, ns)] == [0]
    assert status["rows"] == rows and status.get("reason") == "ConsumerSucceeded", status
    check_exactly_once(read_results(node, ns, world), rows, batch_rows)

    # ttlSecondsAfterFinished: the controller deletes the server's objects; the garbage
    # collector takes its ReplicaSet and pod.
    gone("the server Deployment", lambda: node.apps.read_namespaced_deployment(
        "features-handoff", ns))
    gone("the server Service", lambda: node.core.read_namespaced_service("features-handoff", ns))
    eventually("the server pod is gone", lambda: not server_pods(node, ns), timeout=120,
               interval=1)
    # Deleting the DataLink and the jobs leaves nothing behind.
    group, version, plural = LINKS
    node.custom.delete_namespaced_custom_object(group, version, ns, plural, "features")
    gone("the DataLink", lambda: node.custom.get_namespaced_custom_object(
        group, version, ns, plural, "features"))
    for (group, version, plural), name in [(SPARK, "prep"), (PYTORCH, "train")]:
        node.custom.delete_namespaced_custom_object(group, version, ns, plural, name)
    eventually("every pod of the namespace is gone",
               lambda: not node.core.list_namespaced_pod(ns).items, timeout=120, interval=1)


def test_three_replicas_in_pods_write_and_read_exactly_once(node, scenario):
    """spec.server.replicas: 3 runs the server as a StatefulSet of three pods that reach each
    other by their names under the headless Service (through cluster DNS); the Spark job's
    tasks write each partition to the replica that owns it, and the torch ranks read plans that
    span every replica: every row exactly once, equal batch counts."""
    ns, rows, batch_rows, world = "replicas" + node.namespace_suffix, 12_288, 256, 3
    scenario(ns, {"read": {"batchRows": batch_rows, "shuffle": True, "seed": 3},
                  "server": {"replicas": 3, "memory": "64Mi"}},
             rows=rows, dim=8, workers=world - 1)
    with Operators(node, ns):
        status = wait_phase(node, ns, "Finished")
    pods = sorted(server_pods(node, ns), key=lambda p: p.metadata.name)
    assert [p.metadata.name for p in pods] == [f"features-handoff-{i}" for i in range(3)]
    assert [p.status.container_statuses[0].restart_count for p in pods] == [0, 0, 0]
    assert status["rows"] == rows and status.get("reason") == "ConsumerSucceeded", status
    assert len(status["serverInstance"].split(",")) == 3, status
    check_exactly_once(read_results(node, ns, world), rows, batch_rows)
    if node.job_image is None:
        # On this machine the pods' addresses are reachable: the rows were read from several
        # replicas, not all from the one behind the Service.
        served = [metric(f"http://{pod.status.pod_ip}:8816", "handoff_served_rows_total")
                  for pod in pods]
        assert sum(served) >= rows and sum(1 for n in served if n > 0) >= 2, served


def metric(http_url: str, name: str) -> float:
    """One unlabelled counter or gauge from a server's /metrics."""
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=patience(30)) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} is not in {http_url}/metrics")


def test_a_server_pod_deleted_mid_read_comes_back_and_the_loss_is_reported(node, scenario):
    # No spec.server.spillUrl: the link lives in the pod's memory and emptyDir only, so a new
    # pod cannot have it, and the controller must say what was lost (onServerLoss: Fail).
    # 80 MB read slowly, several times what the connection can hold in flight (gRPC grows its
    # window to many MB; 17 MB once arrived whole before the pod went): the reader is mid-read
    # for real when the pod goes, and keepalive pings notice the server vanished (no RST comes
    # from a pod whose network is gone).
    ns, rows, batch_rows = "restart" + node.namespace_suffix, 300_032, 1024
    scenario(ns, {"read": {"batchRows": batch_rows}}, rows=rows, dim=64, workers=0,
             batch_pause=0.1, columns="id,embedding")
    with Operators(node, ns):
        wait_phase(node, ns, ["Consuming"])
        eventually("the reader is mid-read",
                   lambda: reader_progress(node, ns, "train-master-0") >= 10, timeout=300,
                   interval=0.5)
        [before] = server_pods(node, ns)
        node.core.delete_namespaced_pod(before.metadata.name, ns, grace_period_seconds=0)

        def replaced():
            pods = [p for p in server_pods(node, ns) if p.metadata.uid != before.metadata.uid]
            statuses = pods[0].status.container_statuses if pods else None
            return bool(statuses) and all(s.ready for s in statuses)
        eventually("the Deployment brings a new server pod up", replaced, timeout=180,
                   interval=1)
        status = wait_phase(node, ns, "Failed", timeout=180)
    assert status.get("reason") == "ServerLost", status
    [lost] = [c for c in status["conditions"] if c["type"] == "ServerLost"]
    assert f"{rows} rows" in lost["message"], lost
    assert "no spec.server.spillUrl" in lost["message"], lost
    # What the reader in flight does is not asserted here: it has been seen both finishing with
    # every row (they were already in flight) and still waiting two minutes on. The client's
    # keepalive is tested on its own (test_client.py, a server that stops answering).


def test_the_server_at_its_memory_limit_spills_and_is_not_oom_killed(node, scenario):
    # A 16 MiB budget (the pod's limit is derived from it) and ~33 MB of data: the spill policy
    # moves partitions to the pod's emptyDir instead of growing past the limit.
    ns, rows, batch_rows = "spill" + node.namespace_suffix, 120_000, 1000
    scenario(ns, {"read": {"batchRows": batch_rows}, "server": {"memory": "16Mi"},
                               "policy": {"memoryPolicy": "spill"}},
                    rows=rows, dim=64, workers=0)
    with Operators(node, ns):
        status = wait_phase(node, ns, "Finished")
    assert status["rows"] == rows, status
    assert int(status.get("spilledBytes") or 0) > 0, f"nothing spilled: {status}"
    [pod] = server_pods(node, ns)
    [state] = pod.status.container_statuses
    assert state.restart_count == 0 and state.last_state.terminated is None, state
    check_exactly_once(read_results(node, ns, 1), rows, batch_rows)


EGRESS = r"""
import os, socket
def reach(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "reached"
    except OSError as e:
        return f"refused ({e})"
print("api", reach("10.0.0.1", 443), flush=True)
print("outside", reach(os.environ["OUTSIDE"], 53), flush=True)
"""


def test_pods_reach_services_but_nothing_past_this_machine(node):
    """kube-node.sh keeps test traffic here: a pod reaches the API server through its Service,
    and what it sends past the machine (its uplink's gateway) is dropped."""
    if node.job_image is not None:
        pytest.skip("the egress rules checked here are the local node's (scripts/kube-node.sh)")
    route = run("ip", "-o", "route", "show", "default").stdout.split()
    assert "via" in route, f"this machine has no default route to test against: {route}"
    outside = route[route.index("via") + 1]
    ns = "egress"
    create_namespace(node, ns)
    try:
        pod = Operators(node, ns)._pod("probe", None, {}, EGRESS,
                                               [{"name": "OUTSIDE", "value": outside}])
        node.core.create_namespaced_pod(ns, pod)
        eventually("the probe pod finishes", lambda: node.core.read_namespaced_pod(
            "probe", ns).status.phase in ("Succeeded", "Failed"), timeout=120, interval=1)
        log = pod_log(node, ns, "probe")
        assert "api reached" in log, log
        # Dropped, not refused by the far end: the node's FORWARD rule is what stopped it.
        assert "outside refused (timed out)" in log, log
    finally:
        node.core.delete_namespace(ns)
