"""The ``pytorchjob`` TorchX scheduler: submit an AppDef as a Kubeflow ``kubeflow.org/v1`` PyTorchJob.

One role with N replicas becomes a PyTorchJob with exactly one ``Master`` and N-1 ``Worker`` replicas that
share one pod template. The training operator injects ``MASTER_ADDR``, ``WORLD_SIZE = replicas x
spec.nprocPerNode`` and the ``PET_*`` variables, so ``spec.nprocPerNode`` is always the integer number of
processes per node (the GPU count), never ``auto``. App ids are ``<namespace>:<job name>``.

The Kubernetes client is injectable: pass ``api_client`` (a ``kubernetes.client.ApiClient``), or
``custom_objects_api`` and ``core_v1_api``, to :func:`create_scheduler` (``get_runner(api_client=...)``
forwards it). Otherwise the client is built from the in-cluster service account or the local kubeconfig
on first use.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import yaml
from torchx.schedulers.api import (
    DescribeAppResponse,
    ListAppResponse,
    Scheduler,
    Stream,
    filter_regex,
    split_lines,
)
from torchx.specs import AppDef, AppDryRunInfo, AppState, ReplicaState, ReplicaStatus, Role, RoleStatus, macros
from torchx.specs.api import CfgVal, runopts

from deepspec.launch import k8s
from deepspec.launch.stage_app import NPROC_KEY, STAGE_KEY

GROUP = "kubeflow.org"
VERSION = "v1"
PLURAL = "pytorchjobs"
KIND = "PyTorchJob"
# Pod labels set by the Kubeflow training operator (v1.7 and later); replica types are lowercase.
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"
MANAGED_SELECTOR = "app.kubernetes.io/managed-by=torchx"

# The newest condition whose status is "True" decides the state.
CONDITION_STATES: Mapping[str, AppState] = {
    "Created": AppState.SUBMITTED,
    "Suspended": AppState.PENDING,
    "Restarting": AppState.PENDING,
    "Running": AppState.RUNNING,
    "Succeeded": AppState.SUCCEEDED,
    "Failed": AppState.FAILED,
}


@dataclass
class PyTorchJobRequest:
    """A rendered PyTorchJob and the namespace it is submitted to."""

    namespace: str
    resource: dict[str, Any]

    def __str__(self) -> str:
        return yaml.safe_dump(self.resource, sort_keys=False)


def _nproc_per_node(app: AppDef, role: Role) -> int | None:
    declared = app.metadata.get(NPROC_KEY)
    if declared:
        return int(declared)
    # Apps from other components (dist.ddp, dist.torchrun) carry the count only in the torchrun command.
    found = re.search(r"--nproc[_-]per[_-]node[ =]+['\"]?(\d+)", " ".join(role.args))
    return int(found.group(1)) if found else None


def nproc_per_node(app: AppDef, role: Role) -> str:
    """Return ``spec.nprocPerNode``: the GPU count per node, or the torchrun process count on CPU nodes."""
    processes = _nproc_per_node(app, role)
    gpus = role.resource.gpu
    if gpus > 0:
        if processes is not None and processes != gpus:
            raise ValueError(
                f"role {role.name!r} starts {processes} processes per node but requests {gpus} GPUs per node; "
                f"the operator sets WORLD_SIZE = replicas x nprocPerNode, so both must agree: use "
                f"-j {role.num_replicas}x{gpus} or --gpu {processes}"
            )
        return str(gpus)
    return str(processes or 1)


def render_pytorchjob(app: AppDef, job_name: str, cfg: Mapping[str, CfgVal]) -> dict[str, Any]:
    """Return the PyTorchJob manifest for ``app``; the role's macros are filled in for this job.

    ``${app_id}`` becomes ``<namespace>:<job name>``, the id that ``torchx status`` and ``torchx log`` take.
    """
    if len(app.roles) != 1:
        names = [role.name for role in app.roles]
        raise ValueError(f"a PyTorchJob runs one pod template on every node, but the app has roles {names}")
    role = app.roles[0]
    if role.min_replicas is not None and role.min_replicas != role.num_replicas:
        raise ValueError(
            f"role {role.name!r} is elastic ({role.min_replicas} to {role.num_replicas} nodes); "
            "the pytorchjob scheduler starts a fixed number of nodes, so use -j NxP"
        )
    if not role.image:
        raise ValueError(f"role {role.name!r} has no image; pass --image")
    namespace = str(cfg.get("namespace") or "default")
    values = macros.Values(
        img_root="",
        app_id=f"{namespace}:{job_name}",
        replica_id="${PET_NODE_RANK}",
        rank0_env="MASTER_ADDR",
    )
    filled = values.apply(role)
    stage = str(app.metadata.get(STAGE_KEY) or role.name)
    labels = k8s.deepspec_labels(job_name, stage)
    options = k8s.PodOptions(
        service_account=_optional_str(cfg.get("service_account")),
        image_pull_secret=_optional_str(cfg.get("image_pull_secret")),
        priority_class=_optional_str(cfg.get("priority_class")),
        run_as_user=int(cfg.get("run_as_user") or 10001),
    )
    template = k8s.pod_template(filled, labels, options)
    restart_policy = "OnFailure" if role.max_retries > 0 else "Never"
    replica_specs: dict[str, Any] = {
        "Master": {"replicas": 1, "restartPolicy": restart_policy, "template": template},
    }
    if role.num_replicas > 1:
        replica_specs["Worker"] = {
            "replicas": role.num_replicas - 1,
            "restartPolicy": restart_policy,
            "template": copy.deepcopy(template),
        }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": job_name, "labels": labels},
        "spec": {
            "nprocPerNode": nproc_per_node(app, role),
            "runPolicy": _run_policy(role, cfg),
            "pytorchReplicaSpecs": replica_specs,
        },
    }


def _optional_str(value: CfgVal) -> str | None:
    return str(value) if value not in (None, "") else None


def _run_policy(role: Role, cfg: Mapping[str, CfgVal]) -> dict[str, Any]:
    # "Running" deletes pods still running when the job ends (freeing their GPUs) and keeps finished
    # pods, so their logs stay readable.
    policy: dict[str, Any] = {"cleanPodPolicy": "Running", "backoffLimit": role.max_retries}
    ttl = cfg.get("ttl_seconds_after_finished")
    if ttl is not None:
        policy["ttlSecondsAfterFinished"] = int(ttl)
    queue = _optional_str(cfg.get("queue"))
    priority_class = _optional_str(cfg.get("priority_class"))
    if queue or priority_class:
        scheduling: dict[str, Any] = {"minAvailable": role.num_replicas}
        if queue:
            scheduling["queue"] = queue
        if priority_class:
            scheduling["priorityClass"] = priority_class
        policy["schedulingPolicy"] = scheduling
    return policy


def job_state(resource: Mapping[str, Any]) -> tuple[AppState, str]:
    """Return the TorchX state and the message of a PyTorchJob from its ``status.conditions``."""
    conditions = resource.get("status", {}).get("conditions") or []
    current = [condition for condition in conditions if str(condition.get("status")) == "True"]
    if not current:
        return AppState.SUBMITTED, ""
    newest = current[-1]
    state = CONDITION_STATES.get(str(newest.get("type")), AppState.UNKNOWN)
    return state, str(newest.get("message") or newest.get("reason") or "")


def _replica_statuses(role_name: str, resource: Mapping[str, Any]) -> list[ReplicaStatus]:
    """Return one status per node: the Master is replica 0 and Worker i is replica i + 1."""
    spec_replicas = resource.get("spec", {}).get("pytorchReplicaSpecs", {})
    counts = resource.get("status", {}).get("replicaStatuses") or {}
    statuses: list[ReplicaStatus] = []
    for replica_type in ("Master", "Worker"):
        total = int(spec_replicas.get(replica_type, {}).get("replicas", 0))
        count = counts.get(replica_type, {})
        states = (
            [ReplicaState.SUCCEEDED] * int(count.get("succeeded", 0))
            + [ReplicaState.FAILED] * int(count.get("failed", 0))
            + [ReplicaState.RUNNING] * int(count.get("active", 0))
        )
        states += [ReplicaState.PENDING] * max(0, total - len(states))
        for state in states[:total]:
            statuses.append(ReplicaStatus(id=len(statuses), state=state, role=role_name, hostname=""))
    return statuses


def _split_app_id(app_id: str) -> tuple[str, str]:
    namespace, separator, name = app_id.partition(":")
    if not separator or not namespace or not name:
        raise ValueError(f"app id {app_id!r} is invalid; expected <namespace>:<job name>")
    return namespace, name


class PyTorchJobScheduler(Scheduler[Mapping[str, CfgVal]]):
    """TorchX scheduler that runs each app as one Kubeflow PyTorchJob (needs the Kubeflow training operator)."""

    def __init__(
        self,
        session_name: str,
        api_client: Any = None,
        custom_objects_api: Any = None,
        core_v1_api: Any = None,
    ) -> None:
        super().__init__("pytorchjob", session_name)
        self._api_client = api_client
        self._custom_objects_api = custom_objects_api
        self._core_v1_api = core_v1_api

    def _client(self) -> Any:
        if self._api_client is None:
            from kubernetes import client, config

            configuration = client.Configuration()
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                config.load_kube_config(client_configuration=configuration)
            self._api_client = client.ApiClient(configuration)
        return self._api_client

    def custom_objects(self) -> Any:
        if self._custom_objects_api is None:
            from kubernetes import client

            self._custom_objects_api = client.CustomObjectsApi(self._client())
        return self._custom_objects_api

    def core_v1(self) -> Any:
        if self._core_v1_api is None:
            from kubernetes import client

            self._core_v1_api = client.CoreV1Api(self._client())
        return self._core_v1_api

    def _run_opts(self) -> runopts:
        opts = runopts()
        opts.add("namespace", type_=str, default="default", help="Kubernetes namespace of the PyTorchJob")
        opts.add("queue", type_=str, help="gang-scheduling queue (runPolicy.schedulingPolicy.queue), e.g. Volcano")
        opts.add("priority_class", type_=str, help="PriorityClass name for the pods and the scheduling policy")
        opts.add("service_account", type_=str, help="service account the pods run as")
        opts.add("image_pull_secret", type_=str, help="name of the Secret used to pull the image")
        opts.add("run_as_user", type_=int, default=10001, help="non-root user and group id of the pods")
        opts.add(
            "ttl_seconds_after_finished",
            type_=int,
            help="delete the finished job and its pods after this many seconds (default: keep)",
        )
        return opts

    def _submit_dryrun(self, app: AppDef, cfg: Mapping[str, CfgVal]) -> AppDryRunInfo[PyTorchJobRequest, Any]:
        job_name = k8s.unique_job_name(app.name)
        namespace = str(cfg.get("namespace") or "default")
        request = PyTorchJobRequest(namespace=namespace, resource=render_pytorchjob(app, job_name, cfg))
        return AppDryRunInfo(request, str)

    def _validate(self, app: AppDef, scheduler: str, cfg: Mapping[str, CfgVal]) -> None:
        # Resources are checked while rendering; a role without one gets no limits.
        pass

    def schedule(self, dryrun_info: AppDryRunInfo[PyTorchJobRequest, Any]) -> str:
        from kubernetes.client.rest import ApiException

        request = dryrun_info.request
        try:
            created = self.custom_objects().create_namespaced_custom_object(
                group=GROUP, version=VERSION, namespace=request.namespace, plural=PLURAL, body=request.resource
            )
        except ApiException as error:
            if error.status == 409:
                name = request.resource["metadata"]["name"]
                raise ValueError(f"PyTorchJob {request.namespace}/{name} already exists; submit again") from error
            raise
        return f"{request.namespace}:{created['metadata']['name']}"

    def _get(self, app_id: str) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        namespace, name = _split_app_id(app_id)
        try:
            return self.custom_objects().get_namespaced_custom_object(
                group=GROUP, version=VERSION, namespace=namespace, plural=PLURAL, name=name
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def describe(self, app_id: str) -> DescribeAppResponse | None:
        resource = self._get(app_id)
        if resource is None:
            return None
        state, message = job_state(resource)
        template = resource.get("spec", {}).get("pytorchReplicaSpecs", {}).get("Master", {}).get("template", {})
        containers = template.get("spec", {}).get("containers") or [{}]
        labels = resource.get("metadata", {}).get("labels") or {}
        role_name = str(labels.get(k8s.STAGE_LABEL) or "pytorch")
        replicas = _replica_statuses(role_name, resource)
        role = Role(name=role_name, image=str(containers[0].get("image", "")), num_replicas=len(replicas))
        return DescribeAppResponse(
            app_id=app_id,
            state=state,
            msg=message,
            roles=[role],
            roles_statuses=[RoleStatus(role=role_name, replicas=replicas)],
        )

    def list(self, cfg: Mapping[str, CfgVal] | None = None) -> list[ListAppResponse]:
        namespace = str((cfg or {}).get("namespace") or "default")
        response = self.custom_objects().list_namespaced_custom_object(
            group=GROUP, version=VERSION, namespace=namespace, plural=PLURAL, label_selector=MANAGED_SELECTOR
        )
        apps = []
        for item in response.get("items", []):
            name = item["metadata"]["name"]
            apps.append(ListAppResponse(app_id=f"{namespace}:{name}", state=job_state(item)[0], name=name))
        return apps

    def _cancel_existing(self, app_id: str) -> None:
        namespace, name = _split_app_id(app_id)
        # Foreground deletion removes the pods before the PyTorchJob object disappears.
        self.custom_objects().delete_namespaced_custom_object(
            group=GROUP, version=VERSION, namespace=namespace, plural=PLURAL, name=name, propagation_policy="Foreground"
        )

    def _pod_name(self, namespace: str, name: str, k: int) -> str:
        replica_type, index = ("master", 0) if k == 0 else ("worker", k - 1)
        selector = f"{JOB_NAME_LABEL}={name},{REPLICA_TYPE_LABEL}={replica_type},{REPLICA_INDEX_LABEL}={index}"
        pods = self.core_v1().list_namespaced_pod(namespace=namespace, label_selector=selector)
        if not pods.items:
            raise ValueError(f"no pod of PyTorchJob {namespace}/{name} matches {selector} (not started yet?)")
        return str(pods.items[0].metadata.name)

    def log_iter(
        self,
        app_id: str,
        role_name: str,
        k: int = 0,
        regex: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        should_tail: bool = False,
        streams: Stream | None = None,
    ) -> Iterable[str]:
        """Yield the log lines of node ``k`` (0 is the Master, k > 0 is Worker k - 1) of the ``pytorch`` container."""
        if until is not None:
            raise ValueError("the pytorchjob scheduler cannot stop logs at a time (until); leave it unset")
        if streams not in (None, Stream.COMBINED):
            raise ValueError("Kubernetes pod logs combine stdout and stderr; request the combined stream")
        namespace, name = _split_app_id(app_id)
        pod = self._pod_name(namespace, name, k)
        arguments: dict[str, Any] = {"name": pod, "namespace": namespace, "container": k8s.CONTAINER_NAME}
        if since is not None:
            now = datetime.now(since.tzinfo)
            arguments["since_seconds"] = max(1, int((now - since).total_seconds()))
        if should_tail:
            response = self.core_v1().read_namespaced_pod_log(follow=True, _preload_content=False, **arguments)
            lines: Iterable[str] = _stream_lines(response)
        else:
            lines = split_lines(self.core_v1().read_namespaced_pod_log(**arguments))
        return filter_regex(regex, lines) if regex else lines


def _stream_lines(response: Any) -> Iterator[str]:
    """Yield decoded lines from a streaming (``_preload_content=False``) log response until it closes."""
    try:
        for raw in response:
            yield raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    finally:
        release = getattr(response, "release_conn", None)
        if release is not None:
            release()


def create_scheduler(
    session_name: str,
    api_client: Any = None,
    custom_objects_api: Any = None,
    core_v1_api: Any = None,
    **kwargs: Any,
) -> PyTorchJobScheduler:
    """Return the scheduler; a given ``api_client`` (a ``kubernetes.client.ApiClient``) replaces the kubeconfig."""
    return PyTorchJobScheduler(
        session_name, api_client=api_client, custom_objects_api=custom_objects_api, core_v1_api=core_v1_api
    )
