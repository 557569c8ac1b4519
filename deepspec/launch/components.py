"""TorchX components for the GPU stages, registered as ``deepspec.train``, ``deepspec.cache`` and ``deepspec.eval``.

Each one runs ``torchrun -m deepspec.cli <stage>`` on ``-j NxP`` (N nodes, P processes per node)::

    torchx run -s local_cwd deepspec.train -j 1x2 --gpu 0 --config configs/demo.yaml
    torchx run -s pytorchjob deepspec.train -j 2x8 --config /data/configs/qwen3_4b.yaml

Words after the component options go to the stage, for example ``-- --set train.lr=3e-4``.
"""

# NOTE: TorchX lists every function in this module as a component, so helpers live in stage_app.
from torchx import specs

from deepspec.launch import stage_app as apps


def train(
    *stage_args: str,
    j: str = "1x8",
    config: str | None = None,
    image: str = apps.DEFAULT_IMAGE,
    gpu: int = -1,
    cpu: int = 32,
    memMB: int = 262144,
    h: str | None = None,
    env: dict[str, str] | None = None,
    mounts: list[str] | None = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    name: str | None = None,
) -> specs.AppDef:
    """Train the draft on the target cache with torchrun DDP.

    Args:
        stage_args: extra arguments for ``deepspec train``, for example ``--set train.lr=3e-4``
        j: NxP, N nodes with P processes each (one process per GPU)
        config: pipeline YAML path inside the container; DEEPSPEC_CONFIG when unset
        image: container image with deepspec installed
        gpu: GPUs per node; -1 means one per process
        cpu: CPU cores per node
        memMB: memory per node in MiB
        h: a registered TorchX named resource; overrides gpu, cpu and memMB
        env: extra environment variables, for example DEEPSPEC_DATA_DIR=/data
        mounts: volumes, for example type=volume,src=deepspec-data,dst=/data
        max_retries: number of times the scheduler restarts a failed job
        rdzv_port: port of the c10d rendezvous on the first node
        name: job name prefix; deepspec-train when unset
    """
    return apps.stage_app(
        "train",
        stage_args,
        j=j,
        image=image,
        config=config,
        gpu=gpu,
        cpu=cpu,
        memMB=memMB,
        h=h,
        env=env,
        mounts=mounts,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        name=name,
    )


def cache(
    *stage_args: str,
    j: str = "1x8",
    config: str | None = None,
    image: str = apps.DEFAULT_IMAGE,
    gpu: int = -1,
    cpu: int = 32,
    memMB: int = 262144,
    h: str | None = None,
    env: dict[str, str] | None = None,
    mounts: list[str] | None = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    name: str | None = None,
) -> specs.AppDef:
    """Capture the target's hidden states into the cache, one rank per GPU.

    Args:
        stage_args: extra arguments for ``deepspec cache``, for example ``--set cache.batch_size=8``
        j: NxP, N nodes with P processes each (one process per GPU)
        config: pipeline YAML path inside the container; DEEPSPEC_CONFIG when unset
        image: container image with deepspec installed
        gpu: GPUs per node; -1 means one per process
        cpu: CPU cores per node
        memMB: memory per node in MiB
        h: a registered TorchX named resource; overrides gpu, cpu and memMB
        env: extra environment variables, for example DEEPSPEC_DATA_DIR=/data
        mounts: volumes, for example type=volume,src=deepspec-data,dst=/data
        max_retries: number of times the scheduler restarts a failed job
        rdzv_port: port of the c10d rendezvous on the first node
        name: job name prefix; deepspec-cache when unset
    """
    return apps.stage_app(
        "cache",
        stage_args,
        j=j,
        image=image,
        config=config,
        gpu=gpu,
        cpu=cpu,
        memMB=memMB,
        h=h,
        env=env,
        mounts=mounts,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        name=name,
    )


def eval(
    *stage_args: str,
    config: str | None = None,
    image: str = apps.DEFAULT_IMAGE,
    gpu: int = 1,
    cpu: int = 8,
    memMB: int = 65536,
    h: str | None = None,
    env: dict[str, str] | None = None,
    mounts: list[str] | None = None,
    max_retries: int = 0,
    name: str | None = None,
) -> specs.AppDef:
    """Run speculative decoding on the held-out prompts and write the acceptance report (one process).

    Args:
        stage_args: extra arguments for ``deepspec eval``, for example ``--set eval.max_new_tokens=256``
        config: pipeline YAML path inside the container; DEEPSPEC_CONFIG when unset
        image: container image with deepspec installed
        gpu: GPUs for the process
        cpu: CPU cores
        memMB: memory in MiB
        h: a registered TorchX named resource; overrides gpu, cpu and memMB
        env: extra environment variables, for example DEEPSPEC_DATA_DIR=/data
        mounts: volumes, for example type=volume,src=deepspec-data,dst=/data
        max_retries: number of times the scheduler restarts a failed job
        name: job name prefix; deepspec-eval when unset
    """
    return apps.stage_app(
        "eval",
        stage_args,
        j="1x1",
        image=image,
        config=config,
        gpu=gpu,
        cpu=cpu,
        memMB=memMB,
        h=h,
        env=env,
        mounts=mounts,
        max_retries=max_retries,
        rdzv_port=29500,
        name=name,
    )
