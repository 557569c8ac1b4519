"""Stage output storage: a local or mounted folder, or an ``s3://bucket/prefix`` URI.

Stages read and write plain files under a local root. With an S3 root that local
root is a staging mirror (``storage.staging_dir``, else ``$DEEPSPEC_STAGING_DIR``,
else ``~/.cache/deepspec/staging``), and a :class:`StageSync` around each stage
moves data:

- before the stage: the upstream outputs, and whatever this stage already
  uploaded (a finished manifest, or partial units and checkpoints to resume
  from), are downloaded into the mirror;
- while it runs: new and changed files are uploaded every ``sync_interval_s``
  seconds, so a pod that dies loses at most one interval of work;
- after it succeeds: every file is uploaded, objects the stage deleted
  (old checkpoints) are removed, and ``_MANIFEST.json`` is uploaded last in a
  single PUT. An output without that object does not exist.

The S3 client is boto3 with its standard settings: credentials from the
``AWS_*`` environment variables or the pod's role, and ``AWS_ENDPOINT_URL`` for
S3-compatible stores (MinIO, Ceph, moto).

NOTE: the mirror contains whole upstream outputs, so the local disk must fit the
largest one (the cache, for the cache-reading stages). Multi-node cache builds
need a shared folder (a ReadWriteMany volume), because each node's units must
meet in one place before the finalize step.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepspec.config import ConfigError, PipelineConfig
from deepspec.heartbeat import HEARTBEAT_NAME, writer_gone
from deepspec.manifest import MANIFEST_NAME, read_manifest

logger = logging.getLogger("deepspec.storage")

STAGING_ENV = "DEEPSPEC_STAGING_DIR"
S3_SCHEME = "s3://"


def is_s3_uri(root: str) -> bool:
    return root.startswith(S3_SCHEME)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into the bucket and the prefix without slashes at either end."""
    if not is_s3_uri(uri):
        raise ConfigError(f"storage.root={uri!r} is not an s3:// URI")
    bucket, _, prefix = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ConfigError(f"storage.root={uri!r} names no bucket; write it as s3://<bucket>/<prefix>")
    return bucket, prefix.strip("/")


def _is_temporary(name: str) -> bool:
    # Atomic writes go through ".<name>.<pid>.tmp" files, which are never part of an output.
    return name.startswith(".") and name.endswith(".tmp")


@dataclass(frozen=True)
class RemoteObject:
    size: int
    mtime: float


class S3Store:
    """The S3 half of the mirror: list, upload, download and delete under one prefix."""

    def __init__(self, bucket: str, prefix: str, client: Any | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                import boto3
            except ImportError as error:
                raise ConfigError(
                    "storage.root is an s3:// URI but boto3 is not installed; install it with "
                    "pip install 'deepspec[s3]'"
                ) from error
            self._client = boto3.client("s3")
        return self._client

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def list(self, relative_dir: str) -> dict[str, RemoteObject]:
        """Return ``{path relative to relative_dir: object}`` for every object below it."""
        base = self.key(relative_dir).rstrip("/") + "/"
        found: dict[str, RemoteObject] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
            for item in page.get("Contents", []):
                found[item["Key"][len(base) :]] = RemoteObject(int(item["Size"]), item["LastModified"].timestamp())
        return found

    def exists(self, relative: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(relative))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def upload(self, path: Path, relative: str) -> None:
        self.client.upload_file(str(path), self.bucket, self.key(relative))

    def download(self, relative: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.client.download_file(self.bucket, self.key(relative), str(partial))
        os.replace(partial, path)

    def delete(self, relative: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(relative))


class Storage:
    """One pipeline's storage root; local roots need no copying, S3 roots go through a mirror."""

    def __init__(self, root: str, local_root: Path, remote: S3Store | None) -> None:
        self.root = root
        self.local_root = local_root
        self.remote = remote
        # (size, mtime_ns) of every file this process uploaded or downloaded, by key.
        self._synced: dict[str, tuple[int, int]] = {}

    @property
    def is_remote(self) -> bool:
        return self.remote is not None

    def local_dir(self, stage: str, stage_fingerprint: str) -> Path:
        return self.local_root / stage / stage_fingerprint

    def uri(self, stage: str, stage_fingerprint: str) -> str:
        return f"{self.root.rstrip('/')}/{stage}/{stage_fingerprint}"

    def has_manifest(self, stage: str, stage_fingerprint: str) -> bool:
        if self.remote is None:
            return read_manifest(self.local_dir(stage, stage_fingerprint)) is not None
        return self.remote.exists(f"{stage}/{stage_fingerprint}/{MANIFEST_NAME}")

    def has_anything(self, stage: str, stage_fingerprint: str) -> bool:
        if self.remote is None:
            return self.local_dir(stage, stage_fingerprint).exists()
        return bool(self.remote.list(f"{stage}/{stage_fingerprint}"))

    def heartbeat_age(self, stage: str, stage_fingerprint: str) -> float | None:
        """Return the seconds since a stage last wrote its heartbeat; None without one or when its writer died."""
        if self.remote is None:
            path = self.local_dir(stage, stage_fingerprint) / HEARTBEAT_NAME
            if not path.is_file() or writer_gone(path):
                return None
            return time.time() - path.stat().st_mtime
        found = self.remote.list(f"{stage}/{stage_fingerprint}").get(HEARTBEAT_NAME)
        return None if found is None else time.time() - found.mtime

    def pull(self, stage: str, stage_fingerprint: str) -> int:
        """Mirror one remote output into the local root; return how many files were downloaded."""
        if self.remote is None:
            return 0
        relative_dir = f"{stage}/{stage_fingerprint}"
        local_dir = self.local_dir(stage, stage_fingerprint)
        local_dir.mkdir(parents=True, exist_ok=True)
        downloaded = 0
        with _dir_lock(local_dir):
            objects = self.remote.list(relative_dir)
            # The manifest comes last, so a reader of the mirror never finds it before the data.
            for name in sorted(objects, key=lambda item: item == MANIFEST_NAME):
                target = local_dir / name
                if target.is_file() and target.stat().st_size == objects[name].size:
                    continue
                self.remote.download(f"{relative_dir}/{name}", target)
                os.utime(target, (objects[name].mtime, objects[name].mtime))
                self._synced[f"{relative_dir}/{name}"] = _signature(target.stat())
                downloaded += 1
        if downloaded:
            logger.info("downloaded %d files of %s", downloaded, self.uri(stage, stage_fingerprint))
        return downloaded

    def push(self, stage: str, stage_fingerprint: str, *, final: bool) -> int:
        """Upload new and changed files; with ``final`` also prune deleted ones and upload the manifest last."""
        if self.remote is None:
            return 0
        relative_dir = f"{stage}/{stage_fingerprint}"
        local_dir = self.local_dir(stage, stage_fingerprint)
        remote = self.remote.list(relative_dir)
        local = _local_files(local_dir)
        uploaded = 0
        for name, stat in sorted(local.items()):
            if name == MANIFEST_NAME:
                continue
            key = f"{relative_dir}/{name}"
            if self._unchanged(key, stat, remote.get(name)):
                continue
            self.remote.upload(local_dir / name, key)
            self._synced[key] = _signature(stat)
            uploaded += 1
        # Only a finished output is pruned and published: the pods of a sharded stage upload only their own files.
        if final and MANIFEST_NAME in local:
            for name in sorted(set(remote) - set(local)):
                self.remote.delete(f"{relative_dir}/{name}")
            self.remote.upload(local_dir / MANIFEST_NAME, f"{relative_dir}/{MANIFEST_NAME}")
            uploaded += 1
        if uploaded:
            logger.info("uploaded %d files to %s", uploaded, self.uri(stage, stage_fingerprint))
        return uploaded

    def _unchanged(self, key: str, stat: os.stat_result, remote: RemoteObject | None) -> bool:
        if remote is None or remote.size != stat.st_size:
            return False
        if key in self._synced:
            return self._synced[key] == _signature(stat)
        # A file this process has not synced: S3 times have whole seconds.
        return remote.mtime >= int(stat.st_mtime)


def _signature(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_size, stat.st_mtime_ns


def _local_files(directory: Path) -> dict[str, os.stat_result]:
    files: dict[str, os.stat_result] = {}
    if not directory.is_dir():
        return files
    for path in directory.rglob("*"):
        if path.is_file() and not _is_temporary(path.name) and path.name != ".lock":
            files[path.relative_to(directory).as_posix()] = path.stat()
    return files


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """Serialise mirror downloads between the ranks of one node."""
    with open(directory / ".lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def staging_root(config: PipelineConfig) -> Path:
    configured = config.storage.staging_dir or os.environ.get(STAGING_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "deepspec" / "staging"


def open_storage(config: PipelineConfig, client: Any | None = None) -> Storage:
    """Return the storage for ``config.storage.root``; ``client`` replaces the boto3 S3 client."""
    root = config.storage.root
    if not is_s3_uri(root):
        return Storage(root, Path(root), None)
    bucket, prefix = parse_s3_uri(root)
    local_root = staging_root(config) / bucket / prefix if prefix else staging_root(config) / bucket
    return Storage(root, local_root, S3Store(bucket, prefix, client))


def localize(config: PipelineConfig, storage: Storage) -> PipelineConfig:
    """Return ``config`` with ``storage.root`` pointing at the local root the stages read and write."""
    if not storage.is_remote:
        return config
    local_storage = config.storage.model_copy(update={"root": str(storage.local_root)})
    return config.model_copy(update={"storage": local_storage})


class StageSync:
    """Mirror one stage's inputs before it runs, upload progress while it runs, publish after it succeeds."""

    def __init__(
        self,
        storage: Storage,
        stage: str,
        fingerprints: dict[str, str],
        upstream: tuple[str, ...],
        *,
        interval_s: float,
        publisher: bool,
    ) -> None:
        self.storage = storage
        self.stage = stage
        self.fingerprints = fingerprints
        self.upstream = upstream
        self.interval_s = interval_s
        # Only global rank 0 uploads; the stages write their manifest on rank 0 after a barrier.
        self.publisher = publisher
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StageSync:
        if not self.storage.is_remote:
            return self
        for name in self.upstream:
            if self.storage.has_manifest(name, self.fingerprints[name]):
                self.storage.pull(name, self.fingerprints[name])
        self.storage.pull(self.stage, self.fingerprints[self.stage])
        if self.publisher and self.interval_s > 0:
            self._thread = threading.Thread(target=self._periodic_push, name="deepspec-sync", daemon=True)
            self._thread.start()
        return self

    def _periodic_push(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.storage.push(self.stage, self.fingerprints[self.stage], final=False)
            except Exception as error:  # a failed periodic upload is retried at the next interval
                logger.warning("uploading progress of %s failed: %s; retrying later", self.stage, error)

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if not self.storage.is_remote or not self.publisher:
            return
        # A failed stage still uploads what it finished, so the next pod resumes from there.
        self.storage.push(self.stage, self.fingerprints[self.stage], final=exc_type is None)
