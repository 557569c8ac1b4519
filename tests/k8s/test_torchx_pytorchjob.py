"""The pytorchjob TorchX scheduler: dry runs checked against the PyTorchJob CRD, and the job lifecycle.

The lifecycle tests use the real ``CustomObjectsApi`` and ``CoreV1Api`` on an ``ApiClient`` whose HTTP call is
replaced by an in-memory API server. It records every request and replays the job statuses a test queues.
The CRD schema comes from ``$DEEPSPEC_K8S_SCHEMAS`` (default: ``shared/k8s-schemas`` beside the repository).
"""

from __future__ import annotations

import copy
import io
import json
import os
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest
import yaml
from kubernetes import client
from kubernetes.client import rest
from torchx.runner import get_runner
from torchx.specs import AppState, ReplicaState, parse_app_handle

from deepspec.launch import components
from deepspec.launch.pytorchjob import create_scheduler, job_state

DEFAULT_SCHEMA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "k8s-schemas"
SCHEMA_DIR = Path(os.environ.get("DEEPSPEC_K8S_SCHEMAS", DEFAULT_SCHEMA_DIR))
CRD_FILE = "kubeflow.org_pytorchjobs.yaml"
IMAGE = "registry.example/deepspec/gpu:1.0"
JOBS_PATH = "/apis/kubeflow.org/v1/namespaces/{namespace}/pytorchjobs"


def _strict(schema: Any) -> Any:
    """Return ``schema`` with ``additionalProperties: false`` on every object that lists its properties."""
    if isinstance(schema, dict):
        strict = {key: _strict(value) for key, value in schema.items()}
        if "properties" in strict and "additionalProperties" not in strict:
            if not strict.get("x-kubernetes-preserve-unknown-fields"):
                strict["additionalProperties"] = False
        return strict
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Draft7Validator:
    path = SCHEMA_DIR / CRD_FILE
    if not path.is_file():
        pytest.fail(f"PyTorchJob CRD not found at {path}; set DEEPSPEC_K8S_SCHEMAS to the folder that contains it")
    crd = yaml.safe_load(path.read_text(encoding="utf-8"))
    (version,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def _errors(validator: jsonschema.Draft7Validator, resource: dict[str, Any]) -> list[str]:
    return sorted(
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(resource)
    )


def _dryrun(component: str, args: list[str], cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    info = get_runner().dryrun_component(component, args, "pytorchjob", cfg=cfg or {}, workspace=None)
    return info.request.resource


def _templates(resource: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {kind: spec["template"] for kind, spec in resource["spec"]["pytorchReplicaSpecs"].items()}


@pytest.fixture(autouse=True)
def no_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPSPEC_CONFIG", raising=False)


@pytest.mark.parametrize(
    ("component", "args", "nodes", "nproc"),
    [
        ("deepspec.train", ["-j", "2x8"], 2, "8"),
        ("deepspec.cache", ["-j", "4x8"], 4, "8"),
        ("deepspec.train", ["-j", "1x4"], 1, "4"),
        ("deepspec.eval", [], 1, "1"),
    ],
)
def test_dryrun_matches_crd_and_pod_schema(
    component: str, args: list[str], nodes: int, nproc: str, crd_validator: jsonschema.Draft7Validator
) -> None:
    resource = _dryrun(component, [*args, "--config", "/data/pipeline.yaml", "--image", IMAGE])
    assert _errors(crd_validator, resource) == []
    assert resource["apiVersion"] == "kubeflow.org/v1"
    assert resource["kind"] == "PyTorchJob"
    replica_specs = resource["spec"]["pytorchReplicaSpecs"]
    assert replica_specs["Master"]["replicas"] == 1
    assert replica_specs.get("Worker", {}).get("replicas", 0) == nodes - 1
    assert resource["spec"]["nprocPerNode"] == nproc
    assert resource["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"
    for template in _templates(resource).values():
        pod = client.V1PodTemplateSpec.model_validate(template)
        (container,) = pod.spec.containers
        assert container.name == "pytorch"
        assert container.image == IMAGE
        assert container.resources.limits["nvidia.com/gpu"] == nproc


def test_train_job_shape() -> None:
    resource = _dryrun("deepspec.train", ["-j", "2x8", "--config", "/data/pipeline.yaml"])
    name = resource["metadata"]["name"]
    labels = resource["metadata"]["labels"]
    assert labels["deepspec.ai/stage"] == "train"
    assert labels["app.kubernetes.io/name"] == "deepspec"
    assert labels["app.kubernetes.io/instance"] == name
    assert labels["app.kubernetes.io/component"] == "train"
    master = _templates(resource)["Master"]
    assert master["metadata"]["labels"] == labels
    spec = master["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in spec["volumes"]
    container = spec["containers"][0]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": 29500}]
    command = shlex.split(container["command"][2])
    assert command[0] == "torchrun"
    assert command[command.index("--nnodes") + 1] == "2"
    assert command[command.index("--nproc_per_node") + 1] == "8"
    assert command[command.index("--rdzv_id") + 1] == f"default:{name}"
    assert command[command.index("-m") + 1 :] == ["deepspec.cli", "train", "--config", "/data/pipeline.yaml"]
    # The operator sets MASTER_ADDR to the Master's service; bash expands it before torchrun starts.
    assert "--rdzv_endpoint ${MASTER_ADDR:=localhost}:29500" in container["command"][2]


def test_run_options_reach_the_job(crd_validator: jsonschema.Draft7Validator) -> None:
    cfg = {
        "namespace": "ml",
        "queue": "gpu-queue",
        "priority_class": "training-high",
        "service_account": "deepspec-trainer",
        "image_pull_secret": "registry-credentials",
        "ttl_seconds_after_finished": 3600,
    }
    args = ["-j", "2x8", "--config", "/data/pipeline.yaml", "--mounts", "type=volume,src=deepspec-data,dst=/data"]
    resource = _dryrun("deepspec.train", args, cfg)
    assert _errors(crd_validator, resource) == []
    policy = resource["spec"]["runPolicy"]
    assert policy["schedulingPolicy"] == {"minAvailable": 2, "queue": "gpu-queue", "priorityClass": "training-high"}
    assert policy["ttlSecondsAfterFinished"] == 3600
    spec = _templates(resource)["Worker"]["spec"]
    assert spec["serviceAccountName"] == "deepspec-trainer"
    assert spec["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert spec["priorityClassName"] == "training-high"
    assert {"name": "mount-0", "persistentVolumeClaim": {"claimName": "deepspec-data"}} in spec["volumes"]
    client.V1PodTemplateSpec.model_validate(_templates(resource)["Worker"])


def test_dist_ddp_app_gets_nproc_from_command(crd_validator: jsonschema.Draft7Validator) -> None:
    args = ["-j", "2x8", "--gpu", "8", "--image", IMAGE, "-m", "deepspec.cli", "train"]
    resource = _dryrun("dist.ddp", args)
    assert _errors(crd_validator, resource) == []
    assert resource["spec"]["nprocPerNode"] == "8"
    assert resource["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1


def test_gpu_and_process_mismatch_rejected() -> None:
    with pytest.raises(ValueError) as caught:
        _dryrun("deepspec.train", ["-j", "2x8", "--gpu", "4", "--config", "c.yaml"])
    message = str(caught.value)
    assert "starts 8 processes per node but requests 4 GPUs" in message
    assert "use -j 2x4 or --gpu 8" in message


def test_cpu_job_uses_process_count() -> None:
    resource = _dryrun("deepspec.train", ["-j", "2x2", "--gpu", "0", "--config", "c.yaml"])
    assert resource["spec"]["nprocPerNode"] == "2"
    assert "nvidia.com/gpu" not in _templates(resource)["Master"]["spec"]["containers"][0]["resources"]["limits"]


def test_crd_validator_catches_bad_fields(crd_validator: jsonschema.Draft7Validator) -> None:
    resource = copy.deepcopy(_dryrun("deepspec.train", ["-j", "2x8", "--config", "c.yaml"]))
    resource["spec"]["nprocPerNode"] = 8
    resource["spec"]["runPolicy"]["cleanupPodPolicy"] = "All"
    errors = "\n".join(_errors(crd_validator, resource))
    assert "8 is not of type 'string'" in errors
    assert "'cleanupPodPolicy' was unexpected" in errors


def test_retries_restart_failed_pods(crd_validator: jsonschema.Draft7Validator) -> None:
    resource = _dryrun("deepspec.train", ["-j", "2x8", "--config", "c.yaml", "--max_retries", "3"])
    assert _errors(crd_validator, resource) == []
    assert resource["spec"]["runPolicy"]["backoffLimit"] == 3
    for replica_spec in resource["spec"]["pytorchReplicaSpecs"].values():
        assert replica_spec["restartPolicy"] == "OnFailure"


def test_two_roles_rejected() -> None:
    app = components.train(j="1x8", config="c.yaml")
    app.roles.append(components.cache(j="1x8", config="c.yaml").roles[0])
    scheduler = create_scheduler("test")
    with pytest.raises(ValueError) as caught:
        scheduler.submit_dryrun(app, {})
    assert "the app has roles ['train', 'cache']" in str(caught.value)


def test_long_app_name_fits_pod_names() -> None:
    resource = _dryrun("deepspec.train", ["-j", "2x8", "--config", "c.yaml", "--name", "My_Very" + "-long" * 20])
    name = resource["metadata"]["name"]
    assert len(f"{name}-worker-99") <= 63
    assert name.startswith("my-very-long")


# --- lifecycle against an in-memory API server -------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


class _HTTPResponse:
    """The urllib3 response surface that the kubernetes client reads."""

    def __init__(self, status: int, data: bytes, content_type: str) -> None:
        self.status = status
        self.reason = {200: "OK", 201: "Created", 404: "Not Found", 409: "Conflict"}.get(status, "")
        self.data = data
        self.headers = {"content-type": content_type}
        self.released = False

    def __iter__(self) -> Any:
        return iter(io.BytesIO(self.data))

    def release_conn(self) -> None:
        self.released = True


@dataclass
class FakeKubernetes:
    """In-memory PyTorchJob and Pod API: records requests, replays queued job statuses, serves pod logs."""

    requests: list[Request] = field(default_factory=list)
    jobs: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)

    def api_client(self) -> client.ApiClient:
        # The host is never contacted: call_api below answers every request.
        api = client.ApiClient(client.Configuration(host="http://127.0.0.1:9"))
        api.call_api = self.call_api  # type: ignore[method-assign]
        return api

    def call_api(
        self, method: str, url: str, header_params: Any = None, body: Any = None, post_params: Any = None, **_: Any
    ) -> rest.RESTResponse:
        parts = urlsplit(url)
        request = Request(method, parts.path, parse_qs(parts.query), copy.deepcopy(body))
        self.requests.append(request)
        status, payload = self._route(request)
        if isinstance(payload, str):
            return rest.RESTResponse(_HTTPResponse(status, payload.encode(), "text/plain"))
        return rest.RESTResponse(_HTTPResponse(status, json.dumps(payload).encode(), "application/json"))

    def _route(self, request: Request) -> tuple[int, Any]:
        segments = request.path.strip("/").split("/")
        if segments[:3] == ["apis", "kubeflow.org", "v1"] and segments[5] == "pytorchjobs":
            return self._jobs(request, segments[4], segments[6] if len(segments) > 6 else None)
        if segments[:2] == ["api", "v1"] and segments[4] == "pods":
            if len(segments) == 5:
                selector = dict(item.split("=") for item in request.query["labelSelector"][0].split(","))
                items = [pod for pod in self.pods if selector.items() <= pod["metadata"]["labels"].items()]
                return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}
            if segments[6] == "log" and segments[5] in self.logs:
                return 200, self.logs[segments[5]]
        return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}

    def _jobs(self, request: Request, namespace: str, name: str | None) -> tuple[int, Any]:
        if request.method == "POST":
            key = (namespace, request.body["metadata"]["name"])
            if key in self.jobs:
                return 409, {"kind": "Status", "reason": "AlreadyExists", "code": 409}
            self.jobs[key] = copy.deepcopy(request.body)
            return 201, request.body
        if name is None:
            selector = dict(item.split("=") for item in request.query.get("labelSelector", [""])[0].split(",") if item)
            items = [
                job
                for (job_namespace, _), job in self.jobs.items()
                if job_namespace == namespace and selector.items() <= job["metadata"]["labels"].items()
            ]
            return 200, {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJobList", "items": items}
        job = self.jobs.get((namespace, name))
        if job is None:
            return 404, {"kind": "Status", "reason": "NotFound", "code": 404}
        if request.method == "DELETE":
            del self.jobs[(namespace, name)]
            return 200, {"kind": "Status", "status": "Success"}
        if self.statuses:
            job["status"] = self.statuses.pop(0)
        return 200, job


def _condition(kind: str, message: str = "") -> dict[str, str]:
    return {"type": kind, "status": "True", "reason": f"PyTorchJob{kind}", "message": message}


def _pod(job: str, replica_type: str, index: int) -> dict[str, Any]:
    labels = {
        "training.kubeflow.org/job-name": job,
        "training.kubeflow.org/replica-type": replica_type,
        "training.kubeflow.org/replica-index": str(index),
    }
    return {"metadata": {"name": f"{job}-{replica_type}-{index}", "namespace": "ml", "labels": labels}}


@pytest.fixture
def fake() -> FakeKubernetes:
    return FakeKubernetes()


def test_submit_creates_job(fake: FakeKubernetes) -> None:
    scheduler = create_scheduler("test", api_client=fake.api_client())
    app = components.train(j="2x8", config="/data/pipeline.yaml", image=IMAGE)
    app_id = scheduler.submit(app, {"namespace": "ml"})
    (create,) = fake.requests
    assert create.method == "POST"
    assert create.path == JOBS_PATH.format(namespace="ml")
    name = create.body["metadata"]["name"]
    assert app_id == f"ml:{name}"
    assert create.body["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1


def test_describe_maps_conditions(fake: FakeKubernetes) -> None:
    scheduler = create_scheduler("test", api_client=fake.api_client())
    app_id = scheduler.submit(components.train(j="3x8", config="c.yaml", image=IMAGE), {"namespace": "ml"})
    fake.statuses = [
        {},
        {"conditions": [_condition("Created")]},
        {
            "conditions": [_condition("Created"), _condition("Running")],
            "replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 1}},
        },
        {
            "conditions": [
                _condition("Created"),
                {**_condition("Running"), "status": "False"},
                _condition("Failed", "Worker 1 exited with code 1"),
            ],
            "replicaStatuses": {"Master": {"succeeded": 1}, "Worker": {"succeeded": 1, "failed": 1}},
        },
    ]
    states = []
    for _ in range(4):
        description = scheduler.describe(app_id)
        assert description is not None
        states.append(description.state)
    assert states == [AppState.SUBMITTED, AppState.SUBMITTED, AppState.RUNNING, AppState.FAILED]
    assert description.msg == "Worker 1 exited with code 1"
    (role_status,) = description.roles_statuses
    assert role_status.role == "train"
    replica_states = [replica.state for replica in role_status.replicas]
    assert replica_states == [ReplicaState.SUCCEEDED, ReplicaState.SUCCEEDED, ReplicaState.FAILED]
    assert description.roles[0].image == IMAGE


def test_describe_missing_job_is_none(fake: FakeKubernetes) -> None:
    scheduler = create_scheduler("test", api_client=fake.api_client())
    assert scheduler.describe("ml:deepspec-train-absent") is None


def test_list_returns_torchx_jobs(fake: FakeKubernetes) -> None:
    scheduler = create_scheduler("test", api_client=fake.api_client())
    first = scheduler.submit(components.train(j="1x8", config="c.yaml"), {"namespace": "ml"})
    second = scheduler.submit(components.cache(j="1x8", config="c.yaml"), {"namespace": "ml"})
    fake.jobs[("ml", "other-job")] = {"metadata": {"name": "other-job", "labels": {}}}
    listed = scheduler.list({"namespace": "ml"})
    assert sorted(app.app_id for app in listed) == sorted([first, second])
    assert {app.state for app in listed} == {AppState.SUBMITTED}
    assert fake.requests[-1].query["labelSelector"] == ["app.kubernetes.io/managed-by=torchx"]


def test_cancel_deletes_job(fake: FakeKubernetes) -> None:
    scheduler = create_scheduler("test", api_client=fake.api_client())
    app_id = scheduler.submit(components.eval(config="c.yaml"), {"namespace": "ml"})
    scheduler.cancel(app_id)
    delete = fake.requests[-1]
    assert delete.method == "DELETE"
    assert delete.path == JOBS_PATH.format(namespace="ml") + "/" + app_id.split(":")[1]
    assert delete.query["propagationPolicy"] == ["Foreground"]
    assert fake.jobs == {}
    scheduler.cancel(app_id)
    assert fake.requests[-1].method == "GET"


def test_log_iter_reads_master_and_worker(fake: FakeKubernetes) -> None:
    scheduler = create_scheduler("test", api_client=fake.api_client())
    fake.pods = [_pod("job-a", "master", 0), _pod("job-a", "worker", 0), _pod("job-a", "worker", 1)]
    fake.logs = {
        "job-a-master-0": "step 1 loss 2.0\nstep 2 loss 1.5\n",
        "job-a-worker-1": "worker ready\nstep 2 loss 1.5\n",
    }
    assert list(scheduler.log_iter("ml:job-a", "train", k=0)) == ["step 1 loss 2.0\n", "step 2 loss 1.5\n"]
    worker = list(scheduler.log_iter("ml:job-a", "train", k=2, regex="loss"))
    assert worker == ["step 2 loss 1.5\n"]
    selector = fake.requests[-2].query["labelSelector"][0]
    assert "training.kubeflow.org/replica-type=worker" in selector
    assert "training.kubeflow.org/replica-index=1" in selector
    log_request = fake.requests[-1]
    assert log_request.path == "/api/v1/namespaces/ml/pods/job-a-worker-1/log"
    assert log_request.query["container"] == ["pytorch"]


def test_log_iter_follows_and_limits_time(fake: FakeKubernetes) -> None:
    scheduler = create_scheduler("test", api_client=fake.api_client())
    fake.pods = [_pod("job-b", "master", 0)]
    fake.logs = {"job-b-master-0": "first\nsecond\n"}
    since = datetime.now() - timedelta(minutes=5)
    lines = list(scheduler.log_iter("ml:job-b", "train", since=since, should_tail=True))
    assert lines == ["first\n", "second\n"]
    query = fake.requests[-1].query
    assert query["follow"] == ["true"]
    assert 299 <= int(query["sinceSeconds"][0]) <= 360


def test_log_iter_without_pod_names_selector(fake: FakeKubernetes) -> None:
    scheduler = create_scheduler("test", api_client=fake.api_client())
    with pytest.raises(ValueError) as caught:
        list(scheduler.log_iter("ml:job-c", "train", k=1))
    assert "training.kubeflow.org/replica-type=worker" in str(caught.value)


def test_runner_submits_through_injected_client(fake: FakeKubernetes) -> None:
    runner = get_runner(api_client=fake.api_client())
    handle = runner.run_component(
        "deepspec.train", ["-j", "2x8", "--config", "/data/pipeline.yaml"], "pytorchjob", cfg={"namespace": "ml"}
    )
    scheduler_name, _, app_id = parse_app_handle(handle)
    assert scheduler_name == "pytorchjob"
    fake.statuses = [{"conditions": [_condition("Created"), _condition("Succeeded", "job succeeded")]}]
    status = runner.status(handle)
    assert status is not None
    assert status.state == AppState.SUCCEEDED
    assert app_id.startswith("ml:deepspec-train-")


def test_job_state_ignores_false_conditions() -> None:
    resource = {"status": {"conditions": [_condition("Running"), {**_condition("Restarting"), "status": "False"}]}}
    assert job_state(resource) == (AppState.RUNNING, "PyTorchJobRunning")
