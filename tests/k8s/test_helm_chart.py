"""The deepspec-pipeline chart: helm lint and helm template over a matrix of values files, strict
validation of every rendered object, and the properties every stage pod must have."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from torch.distributed.run import get_args_parser

from deepspec.cli import build_parser
from deepspec.config import validate_config
from tests.k8s.validate import (
    CHART_DIR,
    HELM,
    REPO_ROOT,
    REQUIRED_LABELS,
    STAGE_LABEL,
    STAGES,
    VALUES_DIR,
    WAITS_FOR,
    all_containers,
    find,
    helm_lint,
    helm_template,
    helm_template_result,
    pod_templates,
    run_tool,
    stage_of,
    validate_object,
    validate_objects,
)

VALID_CASES = (
    "default",
    "s3",
    "train-indexed-job",
    "multinode-rwx",
    "regen-sglang",
    "stages-disabled",
    "readme-example",
)
# Values file -> text that helm lint and helm template must print when they reject it.
SCHEMA_REJECTS = {
    "invalid-unknown-key": "at '/train': additional properties 'gpus' not allowed",
    "invalid-enum": "at '/regen/server/engine': value must be one of 'vllm', 'sglang'",
    "invalid-bounds": "at '/cache/gpusPerNode': maximum: got 64, want 16",
    "invalid-config-key": "at '/config/train': additional properties 'learning_rate' not allowed",
}
DEFAULT_VALUES = yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))


def values_files(case: str) -> list[Path]:
    return [] if case == "default" else [VALUES_DIR / f"{case}.yaml"]


@functools.cache
def _rendered(case: str) -> str:
    return json.dumps(helm_template(values_files(case)))


def rendered(case: str) -> list[dict[str, Any]]:
    """Return a fresh copy of the objects rendered for ``case`` (helm runs once per case)."""
    return json.loads(_rendered(case))


def case_values(case: str) -> dict[str, Any]:
    values = copy.deepcopy(DEFAULT_VALUES)
    for path in values_files(case):
        _merge(values, yaml.safe_load(path.read_text(encoding="utf-8")))
    return values


def _merge(base: dict[str, Any], override: dict[str, Any]) -> None:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def stage_pods(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Return (stage, pod template) for every workload pod, the helm test pod excluded."""
    pods = []
    for obj in objects:
        stage = stage_of(obj)
        if stage in STAGES:
            pods += [(stage, template) for template in pod_templates(obj)]
    return pods


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [item for item in all_containers(pod["spec"]) if item["name"] == name]
    assert len(matches) == 1, (
        f"expected one container {name!r}, found {[c['name'] for c in all_containers(pod['spec'])]}"
    )
    return matches[0]


def shm_mounted(pod: dict[str, Any], container_spec: dict[str, Any]) -> bool:
    volumes = {volume["name"]: volume for volume in pod["spec"].get("volumes", [])}
    for mount in container_spec.get("volumeMounts", []):
        if mount["mountPath"] == "/dev/shm":
            return volumes[mount["name"]].get("emptyDir", {}).get("medium") == "Memory"
    return False


def gpu_limit(container_spec: dict[str, Any]) -> str | None:
    return container_spec["resources"]["limits"].get("nvidia.com/gpu")


def config_in(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (config_map,) = [obj for obj in objects if obj["kind"] == "ConfigMap"]
    return yaml.safe_load(config_map["data"]["config.yaml"])


# --- schema generation -------------------------------------------------------------------------


def test_values_schema_matches_config_model() -> None:
    spec = importlib.util.spec_from_file_location(
        "generate_config_schema", REPO_ROOT / "helm" / "generate_config_schema.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = json.loads(module.SCHEMA_PATH.read_text(encoding="utf-8"))
    assert module.updated_values_schema(current) == current, (
        "values.schema.json is out of date with PipelineConfig; run make generate"
    )


def test_default_config_validates() -> None:
    assert validate_config(copy.deepcopy(DEFAULT_VALUES["config"]) | {"storage": {"root": "/data/runs"}})


# --- the valid matrix --------------------------------------------------------------------------


@pytest.mark.parametrize("case", VALID_CASES)
def test_lint_strict_passes(case: str) -> None:
    result = helm_lint(values_files(case))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("case", VALID_CASES)
def test_rendered_objects_validate(case: str) -> None:
    validate_objects(rendered(case))


@pytest.mark.parametrize("case", VALID_CASES)
def test_every_object_labelled(case: str) -> None:
    for obj in rendered(case):
        labels = obj["metadata"]["labels"]
        for key in REQUIRED_LABELS:
            assert key in labels, f"{obj['kind']}/{obj['metadata']['name']} lacks label {key}"
        for template in pod_templates(obj):
            pod_labels = template["metadata"]["labels"]
            for key in (*REQUIRED_LABELS, STAGE_LABEL):
                if key == STAGE_LABEL and obj["kind"] == "Pod":
                    continue
                assert key in pod_labels, f"pod of {obj['metadata']['name']} lacks label {key}"


@pytest.mark.parametrize("case", VALID_CASES)
def test_stage_label_matches_component(case: str) -> None:
    for stage, pod in stage_pods(rendered(case)):
        assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == stage


@pytest.mark.parametrize("case", VALID_CASES)
def test_no_container_runs_as_root(case: str) -> None:
    for obj in rendered(case):
        for pod in pod_templates(obj):
            pod_security = pod["spec"]["securityContext"]
            assert pod_security["runAsNonRoot"] is True
            assert pod_security["runAsUser"] != 0
            assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
            for item in all_containers(pod["spec"]):
                security = item["securityContext"]
                where = f"{obj['metadata']['name']}/{item['name']}"
                assert security.get("runAsUser", pod_security["runAsUser"]) != 0, where
                assert security["runAsNonRoot"] is True, where
                assert security["allowPrivilegeEscalation"] is False, where
                assert security["capabilities"] == {"drop": ["ALL"]}, where
                assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where


@pytest.mark.parametrize("case", VALID_CASES)
def test_every_container_has_requests_and_limits(case: str) -> None:
    for obj in rendered(case):
        for pod in pod_templates(obj):
            for item in all_containers(pod["spec"]):
                resources = item["resources"]
                assert {"cpu", "memory"} <= set(resources["requests"]), item["name"]
                assert {"cpu", "memory"} <= set(resources["limits"]), item["name"]


@pytest.mark.parametrize("case", VALID_CASES)
def test_shm_in_train_cache_and_server_pods(case: str) -> None:
    pods = stage_pods(rendered(case))
    checked = 0
    for stage, pod in pods:
        names = [item["name"] for item in all_containers(pod["spec"])]
        for name in names:
            if name in ("train", "cache", "pytorch", "server"):
                assert shm_mounted(pod, container(pod, name)), f"{stage} container {name} has no memory /dev/shm"
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("case", VALID_CASES)
def test_init_containers_enforce_stage_order(case: str) -> None:
    pods = stage_pods(rendered(case))
    assert pods
    for stage, pod in pods:
        waits = [item for item in pod["spec"].get("initContainers", []) if item["name"].startswith("wait-for-")]
        if stage == "prompts" or pod["spec"]["containers"][0]["name"] == "regen-finalize":
            assert waits == []
            continue
        assert len(waits) == 1, f"{stage} pod has init containers {[w['name'] for w in waits]}"
        assert waits[0]["command"][:3] == ["deepspec", "wait", WAITS_FOR[stage]]
        assert pod["spec"]["initContainers"][0] is waits[0], f"{stage}: the wait must run before any sidecar"


@pytest.mark.parametrize("case", VALID_CASES)
def test_config_map_is_a_valid_pipeline_config(case: str) -> None:
    values = case_values(case)
    config = validate_config(config_in(rendered(case)))
    expected_root = (
        values["storage"]["s3"]["root"]
        if values["storage"]["type"] == "s3"
        else values["storage"]["mountPath"] + "/runs"
    )
    assert config.storage.root == expected_root


@pytest.mark.parametrize("case", VALID_CASES)
def test_disabled_stages_render_nothing(case: str) -> None:
    values = case_values(case)
    rendered_stages = {stage_of(obj) for obj in rendered(case)}
    for stage in STAGES:
        assert (stage in rendered_stages) == values[stage]["enabled"], stage


@pytest.mark.parametrize("case", VALID_CASES)
def test_stage_pods_mount_config(case: str) -> None:
    for stage, pod in stage_pods(rendered(case)):
        for item in all_containers(pod["spec"]):
            env = {entry["name"]: entry.get("value") for entry in item["env"]}
            assert env["DEEPSPEC_CONFIG"] == "/etc/deepspec/config.yaml", f"{stage}/{item['name']}"


def deepspec_commands(item: dict[str, Any]) -> list[list[str]]:
    """Return the deepspec argument lists a container runs, torchrun's module arguments included."""
    command = item["command"]
    if command[:2] == ["/bin/sh", "-c"]:
        script = command[2].replace("\\\n", " ")
        lines = [re.sub(r"^(until|exec) ", "", line.strip()).split(";")[0] for line in script.splitlines()]
        commands = [shlex.split(line) for line in lines if re.match(r"(deepspec|torchrun) ", line)]
    else:
        commands = [command]
    argvs = []
    for argv in commands:
        if argv[0] == "torchrun":
            options = get_args_parser().parse_args(argv[1:])
            assert options.module, f"{item['name']}: torchrun must start a module"
            assert options.training_script == "deepspec.cli", item["name"]
            argvs.append(options.training_script_args)
        elif argv[0] == "deepspec":
            argvs.append(argv[1:])
    return argvs


@pytest.mark.parametrize("case", VALID_CASES)
def test_commands_parse_with_deepspec_cli(case: str) -> None:
    parser = build_parser()
    parsed = 0
    for obj in rendered(case):
        for pod in pod_templates(obj):
            for item in all_containers(pod["spec"]):
                for argv in deepspec_commands(item):
                    parser.parse_args(argv)
                    parsed += 1
    assert parsed >= len(STAGES)


# --- per-case behaviour ------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["default", "multinode-rwx"])
def test_pytorchjob_nproc_equals_gpu_limit(case: str) -> None:
    (job,) = find(rendered(case), "PyTorchJob", "train")
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        pytorch = container(replica["template"], "pytorch")
        assert job["spec"]["nprocPerNode"] == gpu_limit(pytorch)


def test_multinode_pytorchjob_has_workers() -> None:
    (job,) = find(rendered("multinode-rwx"), "PyTorchJob", "train")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] == 3
    assert replicas["Worker"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def test_single_node_pytorchjob_has_no_workers() -> None:
    (job,) = find(rendered("default"), "PyTorchJob", "train")
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}


def test_multinode_cache_indexed_job() -> None:
    objects = rendered("multinode-rwx")
    (job,) = find(objects, "Job", "cache")
    (service,) = find(objects, "Service", "cache")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == 2
    assert service["spec"]["clusterIP"] == "None"
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    script = container(job["spec"]["template"], "cache")["command"][2]
    assert "--nnodes 2 --nproc-per-node 4" in script
    assert gpu_limit(container(job["spec"]["template"], "cache")) == "4"


def test_indexed_job_training_rendezvous() -> None:
    objects = rendered("train-indexed-job")
    (job,) = find(objects, "Job", "train")
    (service,) = find(objects, "Service", "train")
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    for key, value in service["spec"]["selector"].items():
        assert pod_labels[key] == value
    assert service["spec"]["publishNotReadyAddresses"] is True
    script = container(job["spec"]["template"], "train")["command"][2]
    assert f'master="{job["metadata"]["name"]}-0.{service["metadata"]["name"]}"' in script
    assert "join_timeout=1800" in script
    assert '--rdzv-endpoint "$master:29400"' in script
    assert "+ 300 ))" in script
    assert find(objects, "PyTorchJob", "train") == []


def test_s3_storage_env_and_staging() -> None:
    objects = rendered("s3")
    assert [obj for obj in objects if obj["kind"] == "PersistentVolumeClaim"] == []
    for stage, pod in stage_pods(objects):
        volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
        template = volumes["staging"]["ephemeral"]["volumeClaimTemplate"]["spec"]
        assert template["resources"]["requests"]["storage"] == "500Gi"
        for item in all_containers(pod["spec"]):
            env = {entry["name"]: entry for entry in item["env"]}
            assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "deepspec-s3"
            assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "AWS_SECRET_ACCESS_KEY"
            assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage.svc:9000"
            assert env["AWS_REGION"]["value"] == "us-east-1"
            assert env["DEEPSPEC_STAGING_DIR"]["value"] == "/staging"
            assert {"name": "staging", "mountPath": "/staging"} in item["volumeMounts"], f"{stage}/{item['name']}"


def test_pvc_claim_settings() -> None:
    (claim,) = [obj for obj in rendered("multinode-rwx") if obj["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == "cephfs"
    assert claim["spec"]["resources"]["requests"]["storage"] == "40Ti"


def test_existing_claim_used() -> None:
    objects = rendered("regen-sglang")
    assert [obj for obj in objects if obj["kind"] == "PersistentVolumeClaim"] == []
    for _, pod in stage_pods(objects):
        volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "shared-deepspec"


@pytest.mark.parametrize(
    ("case", "engine", "port", "gpus"), [("default", "vllm", 8000, "1"), ("regen-sglang", "sglang", 30000, "2")]
)
def test_regen_server_is_native_sidecar(case: str, engine: str, port: int, gpus: str) -> None:
    objects = rendered(case)
    (job,) = [obj for obj in find(objects, "Job", "regen") if obj["metadata"]["name"].endswith("-regen")]
    pod = job["spec"]["template"]
    server = container(pod, "server")
    assert server in pod["spec"]["initContainers"]
    assert server["restartPolicy"] == "Always"
    writer = container(pod, "server-command")
    names = [item["name"] for item in pod["spec"]["initContainers"]]
    assert names.index("server-command") < names.index("server")
    assert writer["command"] == [
        "deepspec",
        "serve-target",
        "--engine",
        engine,
        "--port",
        str(port),
        "--tensor-parallel-size",
        gpus,
        "--script",
        "/serve/serve.sh",
    ]
    assert writer["image"].endswith("/deepspec-data:0.1.0")
    assert server["command"] == ["sh", "/serve/serve.sh"]
    assert server["image"] == {"vllm": "vllm/vllm-openai:v0.11.0", "sglang": "lmsysorg/sglang:v0.5.4"}[engine]
    assert {"name": "serve", "mountPath": "/serve", "readOnly": True} in server["volumeMounts"]
    probe = server["startupProbe"]["exec"]["command"]
    assert probe[:2] == ["python3", "-c"]
    assert f"http://127.0.0.1:{port}/v1/models" in probe[2]
    assert server["readinessProbe"]["exec"]["command"] == probe
    assert server["ports"] == [{"name": "http", "containerPort": port}]
    assert gpu_limit(server) == gpus
    assert gpu_limit(container(pod, "regen")) is None
    regen = config_in(objects)["regen"]
    assert regen["backend"] == "openai"
    assert regen["openai"]["endpoints"] == [f"http://127.0.0.1:{port}/v1"]


def test_sharded_regen_is_indexed_with_finalize() -> None:
    objects = rendered("regen-sglang")
    jobs = {obj["metadata"]["name"]: obj for obj in find(objects, "Job", "regen")}
    shards = jobs["ds-deepspec-pipeline-regen"]
    assert shards["spec"]["completionMode"] == "Indexed"
    assert shards["spec"]["completions"] == 8
    assert shards["spec"]["parallelism"] == 2
    assert container(shards["spec"]["template"], "regen")["command"] == ["deepspec", "regen", "--num-shards", "8"]
    finalize = jobs["ds-deepspec-pipeline-regen-finalize"]
    script = container(finalize["spec"]["template"], "regen-finalize")["command"][2]
    assert "until deepspec regen --finalize; do" in script


def test_token_and_extra_env() -> None:
    for _, pod in stage_pods(rendered("regen-sglang")):
        for item in pod["spec"]["containers"]:
            env = {entry["name"]: entry for entry in item["env"]}
            assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
            assert env["HF_HUB_ENABLE_HF_TRANSFER"]["value"] == "1"


def test_cpu_processes_without_gpus() -> None:
    objects = rendered("stages-disabled")
    (cache,) = find(objects, "Job", "cache")
    cache_container = container(cache["spec"]["template"], "cache")
    assert cache_container["command"] == [
        "torchrun",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "deepspec.cli",
        "cache",
    ]
    assert gpu_limit(cache_container) is None
    (train,) = find(objects, "Job", "train")
    assert "--nproc-per-node" in container(train["spec"]["template"], "train")["command"]


def test_eval_of_external_draft_waits_for_prompts() -> None:
    objects = helm_template(set_values=["config.eval.draft=/data/drafts/dspark_qwen3_4b", "train.enabled=false"])
    (job,) = find(objects, "Job", "eval")
    (wait,) = job["spec"]["template"]["spec"]["initContainers"]
    assert wait["command"][:3] == ["deepspec", "wait", "prompts"]
    assert validate_config(config_in(objects)).eval.draft == "/data/drafts/dspark_qwen3_4b"


def test_service_account_and_pull_secrets() -> None:
    objects = rendered("multinode-rwx")
    (account,) = [obj for obj in objects if obj["kind"] == "ServiceAccount"]
    assert account["metadata"]["name"] == "deepspec-runner"
    for _, pod in stage_pods(objects):
        assert pod["spec"]["serviceAccountName"] == "deepspec-runner"
        assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


def test_images_follow_registry_and_tag() -> None:
    objects = helm_template(set_values=["image.registry=registry.example/ml", "image.tag=1.2.3"])
    images = {item["image"] for obj in objects for pod in pod_templates(obj) for item in all_containers(pod["spec"])}
    assert images == {
        "registry.example/ml/deepspec-data:1.2.3",
        "registry.example/ml/deepspec-gpu:1.2.3",
        "vllm/vllm-openai:v0.11.0",
    }


def test_helm_test_pod_checks_storage() -> None:
    (pod,) = [obj for obj in rendered("default") if obj["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["command"][2]
    assert 'echo "write check" > "$probe"' in script
    assert script.rstrip().endswith("deepspec status")


# --- rejected values ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(SCHEMA_REJECTS))
def test_schema_rejects_values(case: str) -> None:
    lint = helm_lint(values_files(case))
    assert lint.returncode != 0
    assert SCHEMA_REJECTS[case] in lint.stdout + lint.stderr
    template = helm_template_result(values_files(case))
    assert template.returncode != 0
    assert SCHEMA_REJECTS[case] in template.stderr


def test_multinode_on_read_write_once_fails() -> None:
    result = helm_template_result(values_files("invalid-multinode-rwo"))
    assert result.returncode != 0
    assert "train.nodes is 2 but storage.pvc.accessMode is ReadWriteOnce" in result.stderr
    assert "set storage.pvc.accessMode to ReadWriteMany" in result.stderr


def test_sharded_regen_without_server_fails() -> None:
    result = helm_template_result(set_values=["regen.server.enabled=false", "regen.shards=2"])
    assert result.returncode != 0
    assert "regen.shards is 2 but regen.server.enabled is false" in result.stderr


def test_sharded_regen_with_own_endpoints() -> None:
    external = "http://10.0.0.1:8000/v1"
    objects = helm_template(
        set_values=[
            "regen.server.enabled=false",
            "regen.shards=2",
            "config.regen.backend=openai",
            f"config.regen.openai.endpoints[0]={external}",
        ]
    )
    assert config_in(objects)["regen"]["openai"]["endpoints"] == [external]
    validate_objects(objects)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("config.regen.backend=local", "config.regen.backend is local but regen.server.enabled is true"),
        (
            "config.regen.openai.endpoints[0]=http://10.0.0.1:8000/v1",
            "config.regen.openai.endpoints is set but regen.server.enabled is true",
        ),
    ],
)
def test_sidecar_settings_not_silently_replaced(setting: str, message: str) -> None:
    result = helm_template_result(set_values=[setting])
    assert result.returncode != 0
    assert message in result.stderr


def test_multinode_cache_on_s3_fails() -> None:
    s3 = ["storage.type=s3", "storage.s3.root=s3://bkt/p", "storage.s3.existingSecret=aws", "cache.nodes=2"]
    result = helm_template_result(set_values=s3)
    assert result.returncode != 0
    assert "cache.nodes is 2 with storage.type s3" in result.stderr


def test_regen_in_process_without_server() -> None:
    objects = helm_template(set_values=["regen.server.enabled=false", "regen.shards=1"])
    (job,) = find(objects, "Job", "regen")
    pod = job["spec"]["template"]
    assert [item["name"] for item in pod["spec"]["initContainers"]] == ["wait-for-prompts"]
    regen = container(pod, "regen")
    assert regen["command"] == ["deepspec", "regen"]
    assert regen["image"].endswith("/deepspec-gpu:0.1.0")
    assert gpu_limit(regen) == "1"
    assert config_in(objects)["regen"].get("backend") is None
    validate_objects(objects)


def test_s3_without_secret_fails() -> None:
    result = helm_template_result(set_values=["storage.type=s3", "storage.s3.root=s3://bucket/prefix"])
    assert result.returncode != 0
    assert "storage.s3.existingSecret must name a Secret" in result.stderr


# --- NOTES.txt ---------------------------------------------------------------------------------


def test_notes_print_commands() -> None:
    # A client-side dry run renders NOTES.txt without contacting a cluster.
    result = run_tool([HELM, "install", "ds", CHART_DIR, "--dry-run=client", "--namespace", "ml"])
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    for stage in STAGES:
        assert f"kubectl logs -n ml -l deepspec.ai/stage={stage},app.kubernetes.io/instance=ds -f" in notes
    assert "kubectl get jobs,pytorchjobs -n ml -l app.kubernetes.io/instance=ds" in notes
    assert "deepspec status --config deepspec-config.yaml" in notes
    assert "helm test ds -n ml --logs" in notes


def test_notes_raise_log_stream_limit() -> None:
    result = run_tool([HELM, "install", "ds", CHART_DIR, "--dry-run=client", "-f", VALUES_DIR / "regen-sglang.yaml"])
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "-l deepspec.ai/stage=regen,app.kubernetes.io/instance=ds -f --prefix --max-log-requests 9" in notes
    assert "-l deepspec.ai/stage=train,app.kubernetes.io/instance=ds -f --prefix\n" in notes


# --- the validator itself ----------------------------------------------------------------------


def test_validator_rejects_unknown_field() -> None:
    (job,) = find(rendered("default"), "Job", "prompts")
    job["spec"]["bogusField"] = 1
    with pytest.raises(AssertionError, match="bogusField"):
        validate_object(job)


def test_validator_rejects_unquoted_quantity() -> None:
    (job,) = find(rendered("default"), "Job", "eval")
    job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = 1
    with pytest.raises(Exception, match="nvidia.com/gpu"):
        validate_object(job)


def test_validator_rejects_integer_nproc_per_node() -> None:
    (job,) = find(rendered("default"), "PyTorchJob", "train")
    job["spec"]["nprocPerNode"] = 8
    with pytest.raises(AssertionError, match="nprocPerNode: 8 is not of type 'string'"):
        validate_object(job)


def test_validator_rejects_pytorchjob_typo() -> None:
    (job,) = find(rendered("default"), "PyTorchJob", "train")
    job["spec"]["runPolicy"]["cleanupPodPolicy"] = "None"
    with pytest.raises(AssertionError, match="cleanupPodPolicy"):
        validate_object(job)


def test_validator_rejects_kind_without_schema() -> None:
    with pytest.raises(AssertionError, match="no Kubernetes 1.29.0 schema"):
        validate_object({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})


def test_enabling_next_stage_keeps_existing_objects() -> None:
    """`helm upgrade` that only enables the next stage must not change a Job (their templates are immutable)."""

    def by_name(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}

    before = by_name(helm_template(set_values=["cache.enabled=false", "train.enabled=false", "eval.enabled=false"]))
    after = by_name(helm_template(set_values=["train.enabled=false", "eval.enabled=false"]))
    for key, obj in before.items():
        assert after[key] == obj, key
    assert sorted(set(after) - set(before)) == [("Job", "ds-deepspec-pipeline-cache")]
