"""DataLinks from Python: create one for a producer and a consumer, wait for a phase, read its
status, list and delete them. Shaped like the Kubeflow SDK's clients: a client object and typed
dataclasses. Needs the `kubernetes` package (`pip install handoff[k8s]`).

    from handoff.k8s import DataLinkClient
    links = DataLinkClient(namespace="team-a")
    links.create("features", spark_application="prep", pytorch_job="train")
    status = links.wait_for("features", "Sealed")        # progress on stderr
    print(status.rows, status.endpoint)
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

GROUP = "handoff.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "datalinks"
FIELD_MANAGER = "handoff-python"

# Phases in the order a link goes through them; Failed may come at any point.
PHASES = ("Pending", "Provisioning", "Receiving", "Sealed", "Consuming", "Finished")
FAILED = "Failed"


class DataLinkError(Exception):
    """A DataLink request failed, or the link went somewhere it cannot come back from."""


class DataLinkFailed(DataLinkError):
    """The DataLink reached phase Failed; the message is its status's."""

    def __init__(self, message: str, status: "DataLinkStatus"):
        super().__init__(message)
        self.status = status


class DataLinkTimeout(DataLinkError):
    """The phase was not reached in time."""


@dataclass
class Condition:
    type: str
    status: str
    reason: str = ""
    message: str = ""


@dataclass
class DataLinkStatus:
    """What the controller reports on a DataLink (its `status`)."""

    name: str
    namespace: str
    phase: str = "Pending"
    reason: Optional[str] = None
    endpoint: Optional[str] = None
    rows: Optional[int] = None
    bytes: Optional[int] = None
    partitions: Optional[int] = None
    memory_used: Optional[int] = None
    spilled_bytes: Optional[int] = None
    server_restarts: Optional[int] = None
    conditions: List[Condition] = field(default_factory=list)

    @classmethod
    def of(cls, obj: Dict[str, Any]) -> "DataLinkStatus":
        meta = obj.get("metadata") or {}
        status = obj.get("status") or {}
        return cls(
            name=meta.get("name", ""),
            namespace=meta.get("namespace", ""),
            phase=status.get("phase", "Pending"),
            reason=status.get("reason"),
            endpoint=status.get("endpoint"),
            rows=status.get("rows"),
            bytes=status.get("bytes"),
            partitions=status.get("partitions"),
            memory_used=status.get("memoryUsed"),
            spilled_bytes=status.get("spilledBytes"),
            server_restarts=status.get("serverRestarts"),
            conditions=[Condition(type=c.get("type", ""), status=c.get("status", ""),
                                  reason=c.get("reason", ""), message=c.get("message", ""))
                        for c in status.get("conditions") or []],
        )

    def condition(self, kind: str) -> Optional[Condition]:
        return next((c for c in self.conditions if c.type == kind), None)

    @property
    def message(self) -> str:
        """Why the link is where it is: the message of the condition that names its reason, else
        of the most telling condition that is not True."""
        for c in self.conditions:
            if self.reason and c.reason == self.reason and c.message:
                return c.message
        for c in self.conditions:
            if c.status != "True" and c.message:
                return c.message
        return self.reason or ""

    def reached(self, phase: str) -> bool:
        """Whether the link is at `phase` or past it (Failed is past nothing)."""
        if phase == FAILED or self.phase == FAILED:
            return self.phase == phase
        return PHASES.index(self.phase) >= PHASES.index(phase)

    def summary(self) -> str:
        parts = [f"{self.namespace}/{self.name}: {self.phase}"]
        if self.rows is not None:
            parts.append(f"{self.rows} rows")
        if self.bytes is not None:
            parts.append(f"{self.bytes / 2**20:.1f} MiB")
        if self.reason:
            parts.append(self.reason)
        return ", ".join(parts)


def datalink_manifest(name: str, *, spark_application: str, pytorch_job: Optional[str] = None,
                      train_job: Optional[str] = None, namespace: Optional[str] = None,
                      gate: str = "sealed", server: Optional[Dict[str, Any]] = None,
                      read: Optional[Dict[str, Any]] = None,
                      policy: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The DataLink object for a producer and one consumer (a PyTorchJob or a TrainJob)."""
    if (pytorch_job is None) == (train_job is None):
        raise ValueError("name exactly one consumer: pytorch_job= or train_job=")
    if gate not in ("sealed", "streaming"):
        raise ValueError(f"gate is 'sealed' or 'streaming', not {gate!r}")
    consumer = {"pytorchJob": pytorch_job} if pytorch_job else {"trainJob": train_job}
    spec: Dict[str, Any] = {"producer": {"sparkApplication": spark_application},
                            "consumer": consumer, "policy": {"gate": gate, **(policy or {})}}
    if server:
        spec["server"] = server
    if read:
        spec["read"] = read
    metadata: Dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DataLink", "metadata": metadata,
            "spec": spec}


def _default_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or "default"
    except OSError:
        pass
    try:
        from kubernetes import config
        _, context = config.list_kube_config_contexts()
        return (context or {}).get("context", {}).get("namespace") or "default"
    except Exception:  # no kubeconfig: in a pod the file above answered
        return "default"


def _api_client():
    """In a pod, its service account; elsewhere the kubeconfig (`KUBECONFIG`, ~/.kube/config)."""
    from kubernetes import client, config
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class DataLinkClient:
    """DataLinks in one namespace, through the Kubernetes API.

    Arguments:
        namespace: default: the pod's namespace in a cluster, else the kubeconfig context's.
        api_client: a `kubernetes.client.ApiClient`; default: in-cluster config, else the
            kubeconfig (`KUBECONFIG`, `~/.kube/config`).
    """

    def __init__(self, namespace: Optional[str] = None, api_client: Any = None):
        try:
            from kubernetes import client
        except ImportError as e:
            raise ImportError("handoff.k8s needs the kubernetes package: "
                              "pip install 'handoff[k8s]' (or kubernetes)") from e
        api_client = api_client or _api_client()
        self._api_client = api_client
        self._api = client.CustomObjectsApi(api_client)
        self._rest = client.rest.ApiException
        self.namespace = namespace or _default_namespace()

    def _call(self, what: str, fn: Callable[..., Any], *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._rest as e:
            detail = e.reason
            if e.body:
                try:
                    import json
                    detail = json.loads(e.body).get("message", detail)
                except ValueError:
                    pass
            hint = ""
            if e.status == 404 and what.startswith("DataLinks"):
                hint = "; is the CRD installed (`handoff crd | kubectl apply -f -`)?"
            elif e.status == 403:
                hint = (f"; your account may not {what.split()[0].lower()} DataLinks in "
                        f"{self.namespace} (Kubeflow: kubeflow-edit in the profile)")
            raise DataLinkError(f"{what}: {detail}{hint}") from e

    def apply(self, manifest: Dict[str, Any]) -> DataLinkStatus:
        """Create the DataLink, or update its spec if it exists (server-side apply)."""
        manifest = dict(manifest)
        metadata = dict(manifest.get("metadata") or {})
        namespace = metadata.pop("namespace", None) or self.namespace
        metadata["namespace"] = namespace
        manifest["metadata"] = metadata
        name = metadata.get("name")
        if not name:
            raise ValueError("the DataLink needs metadata.name")
        from kubernetes import dynamic
        resource = dynamic.DynamicClient(self._api_client).resources.get(
            api_version=f"{GROUP}/{VERSION}", kind="DataLink")
        obj = self._call(
            f"apply DataLink {namespace}/{name}", resource.server_side_apply, body=manifest,
            name=name, namespace=namespace, field_manager=FIELD_MANAGER, force_conflicts=True)
        return DataLinkStatus.of(obj.to_dict())

    def create(self, name: str, *, spark_application: str, pytorch_job: Optional[str] = None,
               train_job: Optional[str] = None, **spec: Any) -> DataLinkStatus:
        """Create (or update) a DataLink between a SparkApplication and a PyTorchJob or TrainJob.
        Other keyword arguments: gate, server, read, policy (see `datalink_manifest`)."""
        return self.apply(datalink_manifest(name, spark_application=spark_application,
                                            pytorch_job=pytorch_job, train_job=train_job,
                                            namespace=self.namespace, **spec))

    def get(self, name: str) -> DataLinkStatus:
        obj = self._call(f"get DataLink {self.namespace}/{name}",
                         self._api.get_namespaced_custom_object, GROUP, VERSION, self.namespace,
                         PLURAL, name)
        return DataLinkStatus.of(obj)

    def list(self) -> List[DataLinkStatus]:
        listed = self._call(f"DataLinks in {self.namespace}: list",
                            self._api.list_namespaced_custom_object, GROUP, VERSION,
                            self.namespace, PLURAL)
        return [DataLinkStatus.of(o) for o in listed.get("items", [])]

    def delete(self, name: str) -> None:
        """Delete the DataLink; the controller removes its server and data, not the jobs."""
        self._call(f"delete DataLink {self.namespace}/{name}",
                   self._api.delete_namespaced_custom_object, GROUP, VERSION, self.namespace,
                   PLURAL, name)

    def wait_for(self, name: str, phase: str = "Finished", *, timeout: float = 24 * 3600,
                 interval: float = 2.0,
                 progress: Optional[Callable[[DataLinkStatus], None]] = None) -> DataLinkStatus:
        """Poll until the link reaches `phase` (or one after it) and return its status.
        Raises DataLinkFailed if it fails first (unless `phase` is "Failed"), DataLinkTimeout
        after `timeout` seconds. `progress` gets each status that differs from the last; by
        default a line on stderr."""
        if phase not in PHASES and phase != FAILED:
            raise ValueError(f"phase is one of {', '.join(PHASES + (FAILED,))}, not {phase!r}")
        report = progress or (lambda s: print(s.summary(), file=sys.stderr, flush=True))
        deadline = time.monotonic() + timeout
        last = None
        while True:
            status = self.get(name)
            seen = (status.phase, status.rows, status.reason)
            if seen != last:
                report(status)
                last = seen
            if status.reached(phase):
                return status
            if status.phase == FAILED:
                raise DataLinkFailed(
                    f"DataLink {self.namespace}/{name} failed ({status.reason}): {status.message}",
                    status)
            left = deadline - time.monotonic()
            if left <= 0:
                raise DataLinkTimeout(
                    f"DataLink {self.namespace}/{name} is {status.phase}, not {phase}, after "
                    f"{timeout:g} s: {status.message}")
            time.sleep(min(interval, left))


def _parse(manifest: Any) -> Dict[str, Any]:
    if isinstance(manifest, dict):
        return manifest
    import yaml  # comes with the kubernetes package
    parsed = yaml.safe_load(manifest)
    if not isinstance(parsed, dict):
        raise ValueError("the manifest is not one Kubernetes object (YAML or JSON)")
    return parsed


def apply_object(manifest: Any, namespace: Optional[str] = None, api_client: Any = None) -> Dict:
    """Server-side apply any one namespaced object (a SparkApplication, a PyTorchJob, ...),
    as `kubectl apply --server-side` would; for pipeline steps that create the jobs."""
    from kubernetes import dynamic
    obj = _parse(manifest)
    resource = dynamic.DynamicClient(api_client or _api_client()).resources.get(
        api_version=obj["apiVersion"], kind=obj["kind"])
    namespace = (obj.get("metadata") or {}).get("namespace") or namespace or _default_namespace()
    obj.setdefault("metadata", {})["namespace"] = namespace
    return resource.server_side_apply(body=obj, name=obj["metadata"]["name"],
                                      namespace=namespace, field_manager=FIELD_MANAGER,
                                      force_conflicts=True).to_dict()


def run_datalink_step(manifest: Any, phase: str = "Finished", namespace: Optional[str] = None,
                      timeout: float = 24 * 3600, api_client: Any = None,
                      interval: float = 2.0) -> "tuple[int, str]":
    """Apply a DataLink and wait for `phase`: the body of the Kubeflow Pipelines step
    (`handoff.kfp.datalink`). Returns the link's row count and its status as JSON; raises
    DataLinkFailed, with the DataLink's message, if it fails."""
    import dataclasses
    import json
    obj = _parse(manifest)
    namespace = (obj.get("metadata") or {}).get("namespace") or namespace
    links = DataLinkClient(namespace=namespace, api_client=api_client)
    links.apply(obj)
    status = links.wait_for(obj["metadata"]["name"], phase, timeout=timeout, interval=interval)
    return status.rows or 0, json.dumps(dataclasses.asdict(status))
