"""No package-index configuration of the build machine reaches any image the project builds.

Here apt and pip reach their index only through this machine's own settings (apt sources, Acquire
snippets, auth, pip's index URLs). `scripts/build-base-images.sh` puts them in one layer of their own,
`autoscaler-local/python:bookworm-build`, which every Dockerfile uses only in a throwaway build stage; the
images that run (the stand-ins, the autoscaler and its socket proxy, the stack, the test worker) are built
FROM the clean `autoscaler-local/python:bookworm`. A file removed in a later layer is still in the image
(`docker save` hands it to anyone who pulls it), so every layer of every image is read here, not just the
top view:

* no file of the build variant's configuration layer is in any layer, under its path, with its content;
* no pip configuration, apt auth or netrc file is in any layer at all, and the clean base has no apt
  sources either;
* no file the project's Dockerfiles added, no path in those layers and no image setting (Env, Labels)
  names a host the index configuration names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import docker
import pytest

from tests.docker.conftest import REDIS_IMAGE, DockerEnv

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
POSTGRES_IMAGE_DEFAULT = "autoscaler-local/postgres:15"
# Index configuration wherever it sits: the files the check looks for by name alone.
NEVER = re.compile(
    r"^(etc/pip\.conf|etc/xdg/pip/pip\.conf|root/\.config/pip/pip\.conf|root/\.pip/pip\.conf|"
    r"root/\.netrc|etc/apt/auth\.conf|etc/apt/auth\.conf\.d/[^/]+|"
    r"opt/venv/pip\.conf)$"
)
# Where the build variant's index configuration lives (its CA bundle is public certificates, not config).
INDEX_CONFIG = re.compile(r"^(etc/apt/|etc/pip\.conf$)")
URL = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")
SCANNED_SIZE = 1 << 20


@dataclass
class Layer:
    diff_id: str
    files: dict[str, bytes] = field(default_factory=dict)  # path -> sha256 (regular files)
    names: list[str] = field(default_factory=list)  # every member's path: links, directories, whiteouts too
    small: dict[str, bytes] = field(default_factory=dict)  # path -> content (regular files <= 1 MiB)


def _parse(outer: tarfile.TarFile, name: str, diff_id: str) -> Layer:
    layer = Layer(diff_id)
    with tarfile.open(fileobj=outer.extractfile(name)) as inner:
        for member in inner:
            path = member.name.removeprefix("./")
            layer.names.append(path)
            if not member.isreg():
                continue
            data = inner.extractfile(member).read()  # type: ignore[union-attr]
            layer.files[path] = hashlib.sha256(data).digest()
            if member.size <= SCANNED_SIZE:
                layer.small[path] = data
    return layer


def _saved(*images: str) -> dict[str, list[Layer]]:
    """Every layer of each image as `docker save` hands it out, bottom first; a shared layer is read once."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "images.tar"
        subprocess.run(["docker", "save", "-o", str(archive), *images], check=True, capture_output=True,
                       timeout=600)
        parsed: dict[str, Layer] = {}
        layers_of: dict[str, list[Layer]] = {}
        with tarfile.open(archive) as outer:
            for entry in json.load(outer.extractfile("manifest.json")):  # type: ignore[arg-type]
                config = json.load(outer.extractfile(entry["Config"]))  # type: ignore[arg-type]
                layers = []
                for name, diff_id in zip(entry["Layers"], config["rootfs"]["diff_ids"], strict=True):
                    if diff_id not in parsed:
                        parsed[diff_id] = _parse(outer, name, diff_id)
                    layers.append(parsed[diff_id])
                for tag in entry.get("RepoTags") or []:
                    layers_of[tag] = layers
    missing = [image for image in images if image not in layers_of]
    assert not missing, f"docker save did not name {missing} (saved: {sorted(layers_of)})"
    return layers_of


def _build(client: docker.DockerClient, tag: str, path: Path, buildargs: dict[str, str], dockerfile: str) -> str:
    try:
        client.images.build(path=str(path), dockerfile=dockerfile, tag=tag, buildargs=buildargs, rm=True,
                            forcerm=True, pull=False)
    except docker.errors.BuildError as exc:
        log = "".join(str(chunk.get("stream", chunk)) for chunk in exc.build_log)
        pytest.fail(f"building {tag} failed: {exc}\n{log[-3000:]}", pytrace=False)
    return tag


@pytest.fixture(scope="module")
def built_images(docker_env: DockerEnv, worker_image: str) -> Iterator[dict[str, str]]:
    """Every image the project builds, by what it is: built here from the repository's Dockerfiles."""
    client = docker_env.client
    python_args = {"PYTHON_IMAGE": docker_env.python_image, "PYTHON_BUILD_IMAGE": docker_env.python_build_image}
    tags = {
        "autoscaler (Dockerfile)": _build(client, "astest-hygiene:autoscaler", REPO, python_args, "Dockerfile"),
        "stack (stack/Dockerfile)": _build(client, "astest-hygiene:stack", REPO, python_args, "stack/Dockerfile"),
    }
    images = {
        "python stand-in": docker_env.python_image,
        "redis stand-in": REDIS_IMAGE,
        "postgres stand-in": os.environ.get("POSTGRES_IMAGE", POSTGRES_IMAGE_DEFAULT),
        "test worker": worker_image,
        **tags,
    }
    yield images
    for tag in tags.values():
        client.images.remove(tag, noprune=True)


def test_no_index_configuration_reaches_any_built_image(docker_env: DockerEnv, built_images: dict[str, str]) -> None:
    if docker_env.python_build_image == docker_env.python_image:
        pytest.skip("no build variant: this machine builds from the official images, which need no index settings")
    saved = _saved(docker_env.python_image, docker_env.python_build_image, *built_images.values())
    base = saved[docker_env.python_image]
    base_ids = {layer.diff_id for layer in base}
    variant = [layer for layer in saved[docker_env.python_build_image] if layer.diff_id not in base_ids]
    assert variant, f"{docker_env.python_build_image} adds no layer to {docker_env.python_image}"
    config = {
        path: digest
        for layer in variant
        for path, digest in layer.files.items()
        if INDEX_CONFIG.match(path)
    }
    assert config, "the build variant carries no index configuration: the check would prove nothing"
    # Hosts the index configuration names, but not those any file of the clean base already names (a doc
    # file of Debian's apt names Debian's own mirror; that is not this machine's configuration).
    urls = [url for layer in variant for path, data in layer.small.items() if INDEX_CONFIG.match(path)
            for url in URL.findall(data)]
    hosts = {host.encode() for url in urls if (host := urlsplit(url.decode(errors="replace")).hostname)}
    if any(url.startswith((b"http://", b"https://")) for url in urls):
        assert hosts, f"no host found in the index configuration's URLs {urls}: the host check would prove nothing"
    hosts -= {host for layer in base for data in layer.small.values() for host in hosts if host in data}

    leaks: list[str] = []
    for what, image in built_images.items():
        for number, layer in enumerate(saved[image]):
            where = f"{what} ({image}) layer {number}"
            for path, digest in layer.files.items():
                if config.get(path) == digest:
                    leaks.append(f"{where}: /{path} is the build machine's own")
                elif NEVER.match(path):
                    leaks.append(f"{where}: /{path} (pip/apt credentials or index settings)")
                elif what == "python stand-in" and path.startswith("etc/apt/sources.list"):
                    leaks.append(f"{where}: /{path} (the clean base has no apt sources)")
            if layer.diff_id in base_ids:
                continue
            # An `apt-get update` in a final stage leaves var/lib/apt/lists/<host>_...: names count too.
            for path in layer.names:
                named = sorted(host.decode() for host in hosts if host in path.encode())
                if named:
                    leaks.append(f"{where}: the path /{path} names the index host(s) {', '.join(named)}")
            for path, data in layer.small.items():
                named = sorted(host.decode() for host in hosts if host in data)
                if named:
                    leaks.append(f"{where}: /{path} names the index host(s) {', '.join(named)}")
        # The image's own settings (a build arg turned ENV, a label) are part of what it hands out too.
        config_text = json.dumps(docker_env.client.images.get(image).attrs["Config"]).encode()
        named = sorted(host.decode() for host in hosts if host in config_text)
        if named:
            leaks.append(f"{what} ({image}) config (Env, Labels...) names the index host(s) {', '.join(named)}")
    assert not leaks, "package-index configuration in built images:\n" + "\n".join(leaks)


def test_the_scan_finds_configuration_left_in_a_lower_layer(docker_env: DockerEnv, tmp_path: Path) -> None:
    """The check above reads every layer: a pip.conf deleted by a later layer is still found."""
    (tmp_path / "Dockerfile").write_text(
        "ARG BASE\nFROM ${BASE}\nRUN echo '[global]' > /etc/pip.conf\nRUN rm /etc/pip.conf\n"
    )
    tag = _build(docker_env.client, "astest-hygiene:leaky", tmp_path, {"BASE": docker_env.python_image}, "Dockerfile")
    try:
        found = [
            number for number, layer in enumerate(_saved(tag)[tag])
            if any(NEVER.match(path) for path in layer.files)
        ]
        assert found, "a pip.conf in a lower layer went unseen"
    finally:
        docker_env.client.images.remove(tag)


def test_every_built_image_sits_on_the_clean_base(docker_env: DockerEnv, built_images: dict[str, str]) -> None:
    """Not on the build variant: its configuration layer would be the image's second layer."""
    client = docker_env.client
    clean = client.images.get(docker_env.python_image).attrs["RootFS"]["Layers"]
    variant = client.images.get(docker_env.python_build_image).attrs["RootFS"]["Layers"]
    for what, image in built_images.items():
        layers = client.images.get(image).attrs["RootFS"]["Layers"]
        assert layers[: len(clean)] == clean, f"{what} ({image}) is not built FROM {docker_env.python_image}"
        if variant != clean:
            assert layers[: len(variant)] != variant, f"{what} ({image}) is built FROM the build variant"
