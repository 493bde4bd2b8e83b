"""The Python DataLink API (`handoff.k8s`) and the Kubeflow Pipelines step (`handoff.kfp`),
against a real kube-apiserver (scripts/kube-up.sh) with the real controller (`handoff
controller`) reconciling. No pods run there, so links go as far as Provisioning (the controller
creates the server's Secret and Deployment) or fail on a spec it cannot act on; the whole loop to
Finished is the controller's end-to-end test (crates/handoff-controller/tests/e2e.rs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client as k8s  # noqa: E402

from conftest import REPO, eventually, handoff_bin, patience, stop_process  # noqa: E402
from handoff.k8s import (  # noqa: E402
    DataLinkClient, DataLinkFailed, DataLinkStatus, DataLinkTimeout, datalink_manifest,
    run_datalink_step)

NAMESPACE = "kfp-team"


@pytest.fixture(scope="module")
def cluster():
    """An API server with the DataLink CRD and the controller watching NAMESPACE: its client
    and its kubeconfig."""
    with tempfile.TemporaryDirectory(prefix="handoff-kube-") as tmp:
        up = subprocess.run(["bash", str(REPO / "scripts" / "kube-up.sh"), tmp],
                            capture_output=True, text=True)
        assert up.returncode == 0, f"scripts/kube-up.sh failed:\n{up.stdout}\n{up.stderr}"
        kubeconfig = next(line.split("=", 1)[1] for line in reversed(up.stdout.splitlines())
                          if line.startswith("KUBECONFIG="))
        controller = None
        try:
            api_client = kubernetes.config.new_client_from_config(config_file=kubeconfig)
            crd = yaml.safe_load(subprocess.run([str(handoff_bin()), "crd"], check=True,
                                                capture_output=True, text=True).stdout)
            extensions = k8s.ApiextensionsV1Api(api_client)
            extensions.create_custom_resource_definition(crd)

            def established():
                got = extensions.read_custom_resource_definition(crd["metadata"]["name"])
                return any(c.type == "Established" and c.status == "True"
                           for c in got.status.conditions or [])
            eventually("the DataLink CRD", established)
            k8s.CoreV1Api(api_client).create_namespace({"metadata": {"name": NAMESPACE}})
            log = open(Path(tmp) / "controller.log", "w")
            controller = subprocess.Popen(
                [str(handoff_bin()), "controller", "--namespace", NAMESPACE,
                 "--http-listen", "127.0.0.1:0", "--poll-interval", "500ms"],
                env={**os.environ, "KUBECONFIG": kubeconfig, "RUST_LOG": "info"},
                stdout=log, stderr=subprocess.STDOUT)
            yield api_client, kubeconfig
        finally:
            if controller is not None:
                stop_process(controller)
            subprocess.run(["bash", str(REPO / "scripts" / "kube-up.sh"), "--down", tmp],
                           capture_output=True)


@pytest.fixture(scope="module")
def api(cluster):
    return cluster[0]


@pytest.fixture()
def links(api):
    return DataLinkClient(namespace=NAMESPACE, api_client=api)


def test_create_wait_get_list_and_delete_a_datalink(links):
    created = links.create("features", spark_application="prep", pytorch_job="train",
                           read={"batchRows": 256})
    assert (created.name, created.namespace) == ("features", NAMESPACE)
    seen: list[DataLinkStatus] = []
    status = links.wait_for("features", "Provisioning", timeout=patience(60), interval=0.2,
                            progress=seen.append)
    assert status.reached("Provisioning") and not status.reached("Sealed")
    assert status.endpoint == f"grpc+tls://features-handoff.{NAMESPACE}.svc:8815"
    assert status.condition("ServerReady").status == "False"
    assert seen and seen[-1].phase == status.phase, "progress reports each change"
    assert [s.name for s in links.list()] == ["features"]
    assert links.get("features").phase == status.phase
    with pytest.raises(DataLinkTimeout, match="is Provisioning, not Finished, after 1 s: Deployment"):
        links.wait_for("features", "Finished", timeout=1, interval=0.2, progress=lambda s: None)
    # Applying again updates the spec in place.
    links.create("features", spark_application="prep", pytorch_job="train",
                 read={"batchRows": 512})
    links.delete("features")
    eventually("the finalizer to run and the DataLink to go",
               lambda: not links.list(), timeout=patience(60))


def test_the_pipeline_step_returns_the_links_status(api):
    manifest = yaml.safe_dump(datalink_manifest("step", spark_application="prep",
                                                train_job="train", namespace=NAMESPACE))
    rows, status = run_datalink_step(manifest, "Provisioning", api_client=api, interval=0.2,
                                     timeout=patience(60))
    assert rows == 0
    assert json.loads(status)["phase"] in ("Provisioning", "Receiving")
    DataLinkClient(namespace=NAMESPACE, api_client=api).delete("step")


def test_the_pipeline_step_fails_with_the_datalinks_message(api):
    manifest = datalink_manifest("both", spark_application="prep", pytorch_job="a",
                                 namespace=NAMESPACE)
    manifest["spec"]["consumer"]["trainJob"] = "b"
    with pytest.raises(DataLinkFailed, match="InvalidSpec.*names both a pytorchJob and a trainJob"):
        run_datalink_step(manifest, api_client=api, interval=0.2, timeout=patience(60))


def test_bad_arguments_are_refused_before_any_call(links):
    with pytest.raises(ValueError, match="exactly one consumer"):
        datalink_manifest("x", spark_application="s")
    with pytest.raises(ValueError, match="gate is"):
        datalink_manifest("x", spark_application="s", pytorch_job="p", gate="soon")
    with pytest.raises(ValueError, match="phase is one of"):
        links.wait_for("x", "Done")


def test_the_notebook_example_creates_follows_and_deletes_a_datalink(cluster, links):
    _, kubeconfig = cluster
    env = {**os.environ, "KUBECONFIG": kubeconfig, "PYTHONPATH": str(REPO / "python"),
           "DATALINK_NAMESPACE": NAMESPACE, "DATALINK_NAME": "notebook",
           "DATALINK_PHASE": "Provisioning", "DATALINK_TIMEOUT": str(patience(60))}
    run = subprocess.run([sys.executable, str(REPO / "examples" / "notebook" / "datalink.py")],
                         capture_output=True, text=True, env=env, timeout=patience(180))
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "created DataLink kfp-team/notebook" in out, out
    assert "notebook reached Provisioning; server endpoint grpc+tls://notebook-handoff." in out
    assert "Deployment: notebook-handoff" in out and "Service: notebook-handoff" in out, out
    assert "kfp-team/notebook: Provisioning" in run.stderr, run.stderr
    assert "deleted notebook" in out
    eventually("the example's DataLink to go",
               lambda: "notebook" not in [s.name for s in links.list()], timeout=patience(60))


def test_the_example_pipeline_compiles(tmp_path):
    pytest.importorskip("kfp")
    out = tmp_path / "pipeline.yaml"
    run = subprocess.run([sys.executable, str(REPO / "examples" / "kfp" / "pipeline.py"), str(out)],
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "python")})
    assert run.returncode == 0, run.stderr
    spec = yaml.safe_load(out.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"apply-manifest", "apply-manifest-2", "datalink"}
    assert sorted(tasks["datalink"]["dependentTasks"]) == ["apply-manifest", "apply-manifest-2"]
    outputs = spec["components"]["comp-datalink"]["outputDefinitions"]["parameters"]
    assert set(outputs) == {"rows", "status"}
    datalink = yaml.safe_load(Path(REPO / "examples" / "k8s" / "datalink.yaml").read_text())
    step_inputs = tasks["datalink"]["inputs"]["parameters"]
    assert yaml.safe_load(step_inputs["manifest"]["runtimeValue"]["constant"]) == datalink
    # The step's code is handoff.k8s's, not a copy.
    executor = json.dumps(spec["deploymentSpec"]["executors"]["exec-datalink"])
    assert "run_datalink_step" in executor
