"""Container images: hadolint, Dockerfile rules, and the commands `make build` / `make push` print.

No container engine is needed: the Makefile targets run as dry runs (`make -n`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))
HADOLINT = Path(sys.executable).parent / "hadolint"
ENGINES = ("docker", "podman", "buildah")
# Variables a caller's environment could set that would change what the Makefile prints.
MAKE_ENVIRONMENT_OVERRIDES = (
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
    "REGISTRY",
    "TAG",
    "ENGINE",
    "IMAGES",
    "BUILD_ARGS",
    "ENGINE_FLAGS",
    "ENGINE_BUILD_FLAGS",
    "ENGINE_PUSH_FLAGS",
    "WHEELHOUSE_DEPS",
    "SOURCE_URL",
)
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|(^|_)KEY($|_)|API_?KEY", re.IGNORECASE)


def package_version() -> str:
    match = re.search(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert match is not None, "pyproject.toml has no version line"
    return match.group(1)


def run_make(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key not in MAKE_ENVIRONMENT_OVERRIDES}
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def parse_instructions(text: str) -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs with comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, arguments = full.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def assignments(instruction: str, arguments: str) -> dict[str, str]:
    """Return NAME -> value for an ENV or ARG instruction (value "" when the ARG has no default)."""
    if instruction == "ENV" and "=" not in arguments.split(" ", 1)[0]:
        name, _, value = arguments.partition(" ")
        return {name: value.strip()}
    pairs: dict[str, str] = {}
    for token in re.findall(r'[A-Za-z_][A-Za-z0-9_]*(?:=(?:"[^"]*"|\S*))?', arguments):
        name, _, value = token.partition("=")
        pairs[name] = value.strip('"')
    return pairs


def secret_assignments(instructions: list[tuple[str, str]]) -> list[str]:
    """Return ENV/ARG names that look like credentials and carry a value."""
    found = []
    for instruction, arguments in instructions:
        if instruction not in ("ENV", "ARG"):
            continue
        for name, value in assignments(instruction, arguments).items():
            if SECRET_NAME.search(name) and value:
                found.append(name)
    return found


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(index for index, (instruction, _) in enumerate(instructions) if instruction == "FROM")
    return instructions[last_from:]


@pytest.fixture(params=DOCKERFILES, ids=lambda path: path.name)
def dockerfile(request: pytest.FixtureRequest) -> Path:
    return request.param


def test_dockerfiles_exist_for_both_images() -> None:
    assert {path.name for path in DOCKERFILES} >= {"data.Dockerfile", "gpu.Dockerfile"}


def test_hadolint_passes(dockerfile: Path) -> None:
    result = subprocess.run([str(HADOLINT), str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_lint_docker_target_passes() -> None:
    result = run_make("lint-docker", f"HADOLINT={HADOLINT}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_docker_target_fails_on_findings(tmp_path: Path) -> None:
    sloppy = tmp_path / "sloppy.Dockerfile"
    sloppy.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    result = run_make("lint-docker", f"HADOLINT={HADOLINT}", f"DOCKERFILES={sloppy}")
    assert result.returncode != 0
    assert "DL3008" in result.stdout


def test_final_stage_runs_as_fixed_non_root_uid(dockerfile: Path) -> None:
    stage = final_stage(parse_instructions(dockerfile.read_text()))
    users = [arguments for instruction, arguments in stage if instruction == "USER"]
    assert users, f"{dockerfile.name}: the final stage has no USER"
    user = users[-1].split(":")[0]
    assert user.isdigit(), f"{dockerfile.name}: USER {users[-1]} is not a numeric uid"
    assert int(user) >= 1000


def test_no_secret_in_env_or_arg(dockerfile: Path) -> None:
    assert secret_assignments(parse_instructions(dockerfile.read_text())) == []


def test_secret_check_finds_credentials() -> None:
    instructions = parse_instructions(
        "ARG HF_TOKEN=hf_abc\nARG GITHUB_TOKEN\nENV AWS_SECRET_ACCESS_KEY=x PATH=/bin\nENV API_KEY value\n"
    )
    assert secret_assignments(instructions) == ["HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "API_KEY"]


def test_base_image_is_build_argument(dockerfile: Path) -> None:
    instructions = parse_instructions(dockerfile.read_text())
    first_from = next(index for index, (instruction, _) in enumerate(instructions) if instruction == "FROM")
    global_args: dict[str, str] = {}
    for instruction, arguments in instructions[:first_from]:
        assert instruction == "ARG", f"{dockerfile.name}: {instruction} before the first FROM"
        global_args.update(assignments(instruction, arguments))
    assert global_args.get("BASE_IMAGE"), f"{dockerfile.name}: no ARG BASE_IMAGE with a default"

    stage_names: set[str] = set()
    for instruction, arguments in instructions:
        if instruction != "FROM":
            continue
        image, *rest = arguments.split()
        assert image == "${BASE_IMAGE}" or image in stage_names, f"{dockerfile.name}: FROM {arguments}"
        if len(rest) == 2 and rest[0].upper() == "AS":
            stage_names.add(rest[1])


def test_labels_entrypoint_and_copy_sources(dockerfile: Path) -> None:
    instructions = parse_instructions(dockerfile.read_text())
    labels = " ".join(arguments for instruction, arguments in final_stage(instructions) if instruction == "LABEL")
    for key in ("version", "revision", "source"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert ("ENTRYPOINT", '["deepspec"]') in instructions
    for instruction, arguments in instructions:
        if instruction == "COPY" and not arguments.startswith("--from="):
            assert arguments.startswith("build/wheelhouse/"), f"{dockerfile.name}: COPY {arguments}"


@pytest.mark.parametrize(
    ("engine", "build_command"),
    [("docker", "docker build"), ("podman", "podman build"), ("buildah", "buildah bud")],
)
def test_make_build_commands(engine: str, build_command: str) -> None:
    result = run_make("-n", "build", f"ENGINE={engine}", "BUILD_ARGS=--build-arg BASE_IMAGE=example/base:1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("pip wheel" in line and "--no-deps" in line for line in lines)

    for image in ("data", "gpu"):
        build_lines = [line for line in lines if f"-f docker/{image}.Dockerfile" in line]
        assert len(build_lines) == 1, result.stdout
        command = " ".join(build_lines[0].split())
        assert command.startswith(f"{build_command} ")
        match = re.search(rf"-t localhost:5000/deepspec-{image}:(\S+)", command)
        assert match is not None, command
        assert re.fullmatch(rf"{re.escape(package_version())}-[0-9a-f]{{4,40}}(-dirty)?", match.group(1))
        assert f"--build-arg VERSION={package_version()}" in command
        assert re.search(r"--build-arg REVISION=[0-9a-f]{40}", command)
        assert command.endswith("--build-arg BASE_IMAGE=example/base:1 .")
        assert f'echo "built localhost:5000/deepspec-{image}:{match.group(1)}"' in lines


@pytest.mark.parametrize("engine", ENGINES)
def test_make_push_commands(engine: str) -> None:
    result = run_make("-n", "push", f"ENGINE={engine}", "REGISTRY=registry.example.com/team", "TAG=1.2.3-abc1234")
    assert result.returncode == 0, result.stderr
    push_lines = [" ".join(line.split()) for line in result.stdout.splitlines() if " push " in f" {line} "]
    for image in ("data", "gpu"):
        reference = f"registry.example.com/team/deepspec-{image}:1.2.3-abc1234"
        expected = f"{engine} push {reference}"
        if engine == "buildah":
            expected += f" docker://{reference}"
        assert expected in push_lines
        assert f'echo "pushed {reference}"' in result.stdout


def test_make_build_selected_images_and_engine_flags() -> None:
    result = run_make(
        "-n",
        "build",
        "ENGINE=buildah",
        "IMAGES=data",
        "WHEELHOUSE_DEPS=1",
        "ENGINE_FLAGS=--storage-driver vfs",
        "ENGINE_BUILD_FLAGS=--isolation chroot",
    )
    assert result.returncode == 0, result.stderr
    assert "gpu.Dockerfile" not in result.stdout
    command = next(" ".join(line.split()) for line in result.stdout.splitlines() if "data.Dockerfile" in line)
    assert command.startswith("buildah --storage-driver vfs bud --isolation chroot -f docker/data.Dockerfile")
    assert "--build-arg PIP_NO_INDEX=1" in command
    assert re.search(r'pip wheel .*"torch==[0-9.]+" -r build/wheelhouse/deps/requirements.txt', result.stdout)


@pytest.mark.parametrize(
    ("setting", "message"),
    [("ENGINE=nerdctl", "ENGINE=nerdctl is not supported"), ("IMAGES=cpu", "docker/cpu.Dockerfile does not exist")],
)
def test_make_build_rejects_invalid_setting(setting: str, message: str) -> None:
    result = run_make("-n", "build", setting)
    assert result.returncode != 0
    assert message in result.stderr
    assert "pip wheel" not in result.stdout


def test_tag_marks_dirty_tree(tmp_path: Path) -> None:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "docker", tmp_path / "docker")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "--quiet"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "."], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "--quiet", "-m", "images"], cwd=tmp_path, check=True)
    revision = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, check=True, capture_output=True, text=True
    ).stdout.strip()

    clean = run_make("-n", "push", "ENGINE=docker", "IMAGES=data", cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    assert f"docker push localhost:5000/deepspec-data:{package_version()}-{revision}\n" in clean.stdout

    (tmp_path / "new_file.txt").write_text("untracked\n")
    dirty = run_make("-n", "push", "ENGINE=docker", "IMAGES=data", cwd=tmp_path)
    assert f"docker push localhost:5000/deepspec-data:{package_version()}-{revision}-dirty\n" in dirty.stdout


def write_wheel(directory: Path, requires_dist: list[str], extras: list[str]) -> Path:
    metadata = ["Metadata-Version: 2.4", "Name: deepspec", "Version: 9.9.9"]
    metadata += [f"Provides-Extra: {extra}" for extra in extras]
    metadata += [f"Requires-Dist: {requirement}" for requirement in requires_dist]
    wheel = directory / "deepspec-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("deepspec-9.9.9.dist-info/METADATA", "\n".join(metadata) + "\n")
    return wheel


def run_requirements_script(*args: str) -> subprocess.CompletedProcess[str]:
    script = REPO / "docker" / "wheel_requirements.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)


def test_wheel_requirements_keeps_chosen_extras(tmp_path: Path) -> None:
    write_wheel(
        tmp_path,
        [
            "torch<2.14,>=2.6",
            'tomli>=2; python_version < "3.11"',
            'boto3<2,>=1.34; extra == "s3"',
            'kubernetes<38,>=37; extra == "k8s"',
        ],
        ["s3", "k8s"],
    )
    output = tmp_path / "requirements.txt"
    result = run_requirements_script(str(tmp_path), "--extras", "s3", "--output", str(output))
    assert result.returncode == 0, result.stderr
    lines = [line for line in output.read_text().splitlines() if not line.startswith("#")]
    assert lines == ["torch<2.14,>=2.6", 'tomli>=2; python_version < "3.11"', "boto3<2,>=1.34"]


def test_wheel_requirements_rejects_unknown_extra(tmp_path: Path) -> None:
    write_wheel(tmp_path, ["torch"], ["s3"])
    result = run_requirements_script(str(tmp_path), "--extras", "gpu", "--output", str(tmp_path / "r.txt"))
    assert result.returncode != 0
    assert "gpu not defined by deepspec-9.9.9-py3-none-any.whl; choose from s3" in result.stderr


def test_wheel_requirements_needs_one_wheel(tmp_path: Path) -> None:
    result = run_requirements_script(str(tmp_path), "--output", str(tmp_path / "r.txt"))
    assert result.returncode != 0
    assert "expected one deepspec-*.whl" in result.stderr
