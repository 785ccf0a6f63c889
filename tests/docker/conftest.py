"""Fixtures of the Docker end-to-end tests: the real engine (or a fast, clear failure), the test worker image,
Compose projects with unique names that are always torn down.

These tests never skip for lack of Docker: CI runs them after `scripts/docker-up.sh` and
`scripts/build-base-images.sh`, so an unreachable daemon or a missing base image is a failure to see.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
from dockertest import COMPOSE_DIR, ComposeProject, compose_command, unique_name

from autoscaler.backends.docker_client import DockerConnection

IMAGES_DIR = Path(__file__).parent / "images"
PYTHON_IMAGE = os.environ.get("PYTHON_IMAGE", "autoscaler-local/python:bookworm")
REDIS_IMAGE = os.environ.get("REDIS_IMAGE", "autoscaler-local/redis:7")
# Build stages only: the base image plus this machine's package-index settings (scripts/images.env); a
# machine on the official images needs none and builds from PYTHON_IMAGE.
PYTHON_BUILD_IMAGE = os.environ.get("PYTHON_BUILD_IMAGE") or (
    PYTHON_IMAGE if os.environ.get("PYTHON_IMAGE") else "autoscaler-local/python:bookworm-build"
)
WORKER_REPOSITORY = "astest-worker"
SETUP_HINT = "run scripts/docker-up.sh and scripts/build-base-images.sh first"


@dataclass(frozen=True)
class DockerEnv:
    client: docker.DockerClient
    compose: list[str]
    python_image: str
    redis_image: str
    python_build_image: str


def _connect() -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except docker.errors.DockerException as exc:
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        pytest.fail(f"the Docker engine at {host} is not reachable ({exc}); {SETUP_HINT}", pytrace=False)
    return client


def _require_image(client: docker.DockerClient, tag: str) -> None:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {tag} is missing (no registry is reachable, nothing is pulled); {SETUP_HINT}",
                    pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def docker_env() -> Iterator[DockerEnv]:
    """The engine and base images, checked once: every test here fails at once, clearly, without them."""
    client = _connect()
    _require_image(client, PYTHON_IMAGE)
    _require_image(client, REDIS_IMAGE)
    _require_image(client, PYTHON_BUILD_IMAGE)
    try:
        compose = compose_command()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield DockerEnv(client=client, compose=compose, python_image=PYTHON_IMAGE, redis_image=REDIS_IMAGE,
        python_build_image=PYTHON_BUILD_IMAGE,
    )
    client.close()


def _worker_tag(client: docker.DockerClient) -> str:
    # The tag names the inputs, so an edit of the image files (or a rebuilt base) builds a new image.
    digest = hashlib.sha256(client.images.get(PYTHON_IMAGE).id.encode())
    digest.update(client.images.get(PYTHON_BUILD_IMAGE).id.encode())
    for path in sorted(IMAGES_DIR.joinpath("worker").iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return f"{WORKER_REPOSITORY}:{digest.hexdigest()[:12]}"


@pytest.fixture(scope="session")
def worker_image(docker_env: DockerEnv) -> str:
    """The Celery worker test image, built from tests/docker/images/worker unless its tag already exists."""
    client = docker_env.client
    tag = _worker_tag(client)
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        try:
            client.images.build(
                path=str(IMAGES_DIR / "worker"), tag=tag, rm=True,
                buildargs={"PYTHON_IMAGE": PYTHON_IMAGE, "PYTHON_BUILD_IMAGE": PYTHON_BUILD_IMAGE},
                forcerm=True, pull=False,
            )
        except docker.errors.BuildError as exc:
            log = "".join(str(chunk.get("stream", chunk)) for chunk in exc.build_log)
            pytest.fail(f"building {tag} failed: {exc}\n{log[-3000:]}", pytrace=False)
    return tag


@pytest.fixture
def connection() -> Iterator[DockerConnection]:
    """A DockerConnection to the real engine, as the controller builds it."""
    conn = DockerConnection()
    yield conn
    conn.close()


ProjectFactory = Callable[..., ComposeProject]


@pytest.fixture
def compose_project(docker_env: DockerEnv, worker_image: str) -> Iterator[ProjectFactory]:
    """Factory: `compose_project("worker.yaml")` brings a uniquely named project up; all are torn down."""
    projects: list[ComposeProject] = []

    def make(file: str, *services: str, tag: str = "", env: dict[str, str] | None = None) -> ComposeProject:
        project = ComposeProject(
            name=unique_name(tag),
            file=COMPOSE_DIR / file,
            client=docker_env.client,
            command=docker_env.compose,
            env={"WORKER_IMAGE": worker_image, "REDIS_IMAGE": docker_env.redis_image, **(env or {})},
        )
        projects.append(project)
        project.up(*services)
        return project

    yield make
    for project in projects:
        project.down()
