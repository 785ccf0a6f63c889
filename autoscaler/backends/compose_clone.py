"""Cloning a Compose replica: the create body, networks and name of a new container like the template's.

Pure functions over a `docker inspect` of the template replica (the service's own newest container).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import docker
from loguru import logger

from autoscaler.backends.base import OWNER_LABEL, BackendError, LeaseLostError, TargetNotFoundError
from autoscaler.backends.compose_model import (
    CLONE_LABEL,
    CONTAINER_NUMBER_LABEL,
    VERSION_LABEL,
    Replica,
    ServiceRef,
    nothing_to_clone,
)
from autoscaler.backends.docker_client import DockerConnection, DockerNotFoundError, untyped_api
from autoscaler.backends.start_backoff import StartBackoff
from autoscaler.policy.model import PoolPolicy

__all__ = [
    "START_WORKERS",
    "Clone",
    "Cloner",
    "Endpoint",
    "clone_config",
    "endpoints",
    "name_separator",
    "next_numbers",
    "with_network",
]

START_WORKERS = 8

# Container fields that belong to one container only and must not be cloned.
_PER_CONTAINER_CONFIG = ("Hostname", "MacAddress")
# Host-config fields the daemon derives itself (from Privileged and SecurityOpt systempaths=...): left out,
# so that a create never sends a /proc mask list of its own (the socket proxy refuses one).
_DERIVED_HOST_CONFIG = ("MaskedPaths", "ReadonlyPaths")


@dataclass(frozen=True, slots=True)
class Endpoint:
    network: str
    aliases: tuple[str, ...]
    links: tuple[tuple[str, str], ...]
    driver_opts: dict[str, str] | None


@dataclass(frozen=True, slots=True)
class Clone:
    """Everything needed to create one new replica."""

    name: str
    config: dict[str, Any]
    primary: Endpoint | None
    others: tuple[Endpoint, ...]


def name_separator(template: dict[str, Any], target: ServiceRef) -> str:
    # docker-compose v1 names replicas project_service_N, v2 project-service-N: follow the template.
    labels = template["Config"].get("Labels") or {}
    name = str(template.get("Name", "")).lstrip("/")
    number = labels.get(CONTAINER_NUMBER_LABEL, "")
    for separator in ("-", "_"):
        if name == separator.join((target.project, target.service, number)):
            return separator
    return "_" if str(labels.get(VERSION_LABEL, "")).startswith("1.") else "-"


def _endpoint(network: str, settings: dict[str, Any], *, template: dict[str, Any], name: str) -> Endpoint:
    template_name = str(template.get("Name", "")).lstrip("/")
    own = {str(template.get("Id", ""))[:12], template_name}
    aliases = [a for a in settings.get("Aliases") or [] if a not in own]
    if template_name in (settings.get("Aliases") or []):
        aliases.insert(0, name)  # Compose v2 aliases each container by its own name
    links = tuple(_split_link(str(link)) for link in settings.get("Links") or [])
    if network in ("bridge", "host", "none"):
        aliases = []  # the daemon refuses aliases outside user-defined networks
    ipam = settings.get("IPAMConfig") or {}
    if ipam.get("IPv4Address") or ipam.get("IPv6Address"):
        logger.warning("{}: the template has a fixed IP on {}; a clone gets one from the pool", name, network)
    return Endpoint(network, tuple(dict.fromkeys(aliases)), links, settings.get("DriverOpts") or None)


def _split_link(link: str) -> tuple[str, str]:
    container, _, alias = link.partition(":")
    return container, alias or container


def endpoints(template: dict[str, Any], *, name: str) -> tuple[Endpoint | None, tuple[Endpoint, ...]]:
    mode = str(template["HostConfig"].get("NetworkMode") or "")
    networks: dict[str, Any] = template.get("NetworkSettings", {}).get("Networks") or {}
    if mode in ("host", "none") or mode.startswith(("container:", "service:")) or not networks:
        return None, ()
    endpoints = [_endpoint(net, networks[net], template=template, name=name) for net in sorted(networks)]
    # API < 1.44 accepts one network at create; the others are connected before the first start.
    primary = next((e for e in endpoints if e.network == mode), endpoints[0])
    return primary, tuple(e for e in endpoints if e is not primary)


def clone_config(template: dict[str, Any], *, pool: str, number: int, image: str) -> dict[str, Any]:
    """The create body for a clone of `template` (a `docker inspect`): same config and host config.

    The host config is passed through whole rather than rebuilt with `create_host_config`: the daemon
    accepts its own inspect output, and every option (limits, mounts, init, caps, tmpfs, ulimits, log
    config, restart policy...) is kept, including ones docker-py has no keyword for.
    """
    config = {k: v for k, v in template["Config"].items() if k not in _PER_CONTAINER_CONFIG}
    config["Image"] = image
    config["Labels"] = {
        **(template["Config"].get("Labels") or {}),
        CONTAINER_NUMBER_LABEL: str(number),
        OWNER_LABEL: pool,
        CLONE_LABEL: "true",
    }
    host_config = {k: v for k, v in template["HostConfig"].items() if k not in _DERIVED_HOST_CONFIG}
    host_config["ContainerIDFile"] = ""
    config["HostConfig"] = host_config
    return config


def with_network(client: docker.DockerClient, clone: Clone) -> dict[str, Any]:
    if clone.primary is None:
        return clone.config
    endpoint = clone.primary
    networking = untyped_api(client).create_networking_config(
        {
            endpoint.network: client.api.create_endpoint_config(
                aliases=list(endpoint.aliases) or None, links=list(endpoint.links) or None,
                driver_opt=endpoint.driver_opts,
            )
        }
    )
    return {**clone.config, "NetworkingConfig": networking}


def next_numbers(replicas: Iterable[Replica], *, count: int) -> list[int]:
    highest = max((r.number for r in replicas), default=0)
    return list(range(highest + 1, highest + 1 + count))


class Cloner:
    """Creates and starts clones of a service's newest container; counts the creates under way per pool.

    Docker is the only source of a clone's configuration (`template`): the service's own newest container,
    running ones first. A scale-up's new containers are reported to the StartBackoff, which judges them.
    """

    def __init__(
        self,
        docker_connection: DockerConnection,
        *,
        inspect: Callable[[str], dict[str, Any]],
        discard: Callable[[str, str], None],
        backoff: StartBackoff,
        clock: Callable[[], float],
        start_workers: int = START_WORKERS,
    ) -> None:
        self._docker = docker_connection
        self._inspect = inspect
        self._discard = discard
        self._backoff = backoff
        self._clock = clock
        self._starter = ThreadPoolExecutor(max_workers=start_workers, thread_name_prefix="compose-start")
        self._lock = threading.Lock()
        self._starting: dict[str, int] = {}  # pool -> containers being created/started
        self._seen_templates: dict[ServiceRef, dict[str, Any]] = {}  # inspect of the newest replica seen

    def starting(self, pool: str) -> int:
        with self._lock:
            return self._starting.get(pool, 0)

    def close(self) -> None:
        self._starter.shutdown(wait=False, cancel_futures=True)

    def template(self, target: ServiceRef, replicas: list[Replica]) -> dict[str, Any] | None:
        """The newest replica's inspect, running ones first (cached per target): what a clone copies."""
        if not replicas:
            return None
        newest = max(replicas, key=lambda r: (r.state == "running", *r.newest_first_key()))
        cached = self._seen_templates.get(target)
        if cached is not None and cached.get("Id") == newest.id:
            return cached
        try:
            template = self._inspect(newest.id)
        except DockerNotFoundError:
            return None  # removed since the listing: the next tick lists again
        self._seen_templates[target] = template
        return template

    def scale_up(self, pool: PoolPolicy, target: ServiceRef, replicas: list[Replica], *, count: int) -> None:
        template = self._template_for(pool, target, replicas)
        image = self._image_for(template)
        separator = name_separator(template, target)
        clones = [
            self._plan_clone(template, pool=pool, target=target, number=n, separator=separator, image=image)
            for n in next_numbers(replicas, count=count)
        ]
        self._track_starting(pool, len(clones))
        try:
            futures = [self._starter.submit(self._create_and_start, target, clone) for clone in clones]
            wait(futures)
        finally:
            self._track_starting(pool, -len(clones))
        errors = [f.exception() for f in futures if f.exception() is not None]
        lost = next((e for e in errors if isinstance(e, LeaseLostError)), None)
        # A failed create or start ("port is already allocated") is a failed round: the next tick would only
        # create and remove the same containers again. A lost lease is no verdict on the replicas.
        failed = [e for e in errors if not isinstance(e, LeaseLostError)]
        self._backoff.started(pool.name, [f.result() for f in futures if f.exception() is None], self._clock(),
                              failed=len(failed), error=str(failed[0]) if failed else "")
        if lost is not None:
            # Not a failed start: this replica may no longer act. Clones it created and could not start are
            # left for the next leader's leftover repair (removing them needs the lease too).
            raise LeaseLostError(f"{target}: started {len(clones) - len(errors)} of {len(clones)}; {lost}")
        if errors:
            raise BackendError(
                f"{target}: started {len(clones) - len(errors)} of {len(clones)} new replicas; "
                f"{len(errors)} failed (and were removed): {errors[0]}"
            )

    def _template_for(self, pool: PoolPolicy, target: ServiceRef, replicas: list[Replica]) -> dict[str, Any]:
        template = self.template(target, replicas)
        if template is None:
            raise TargetNotFoundError(nothing_to_clone(target, pool))
        return template

    def _image_for(self, template: dict[str, Any]) -> str:
        """The template's image by name if the tag still points at it, else by id: clones stay identical."""
        name, image_id = str(template["Config"]["Image"]), str(template.get("Image", ""))
        try:
            current = self._docker.call(f"inspect image {name}", lambda c: untyped_api(c).inspect_image(name))
        except DockerNotFoundError:
            current = {}
        if not image_id or current.get("Id") == image_id:
            return name
        logger.warning("image {} has moved since the template replica was created; cloning with {} "
                       "(run `docker compose up -d` to roll out the new image)", name, image_id[:19])
        return image_id

    def _plan_clone(
        self,
        template: dict[str, Any],
        *,
        pool: PoolPolicy,
        target: ServiceRef,
        number: int,
        separator: str,
        image: str,
    ) -> Clone:
        name = separator.join((target.project, target.service, str(number)))
        primary, others = endpoints(template, name=name)
        config = clone_config(template, pool=pool.name, number=number, image=image)
        return Clone(name=name, config=config, primary=primary, others=others)

    def _create_and_start(self, target: ServiceRef, clone: Clone) -> str:
        created = self._docker.call(
            f"create container {clone.name} for {target}",
            lambda c: untyped_api(c).create_container_from_config(with_network(c, clone), name=clone.name),
            retry=False,
        )
        container_id = str(created["Id"])
        try:
            for endpoint in clone.others:
                self._connect(container_id, clone.name, endpoint)
            self._docker.call(
                f"start container {clone.name}", lambda c: c.api.start(container_id), retry=False
            )
        except BackendError:
            self._discard(container_id, clone.name)
            raise
        logger.debug("{}: started {} ({})", target, clone.name, container_id[:12])
        return container_id

    def _connect(self, container_id: str, name: str, endpoint: Endpoint) -> None:
        def connect(client: docker.DockerClient) -> None:
            client.api.connect_container_to_network(
                container_id, endpoint.network, aliases=list(endpoint.aliases) or None,
                links=list(endpoint.links) or None, driver_opt=endpoint.driver_opts,
            )

        self._docker.call(f"connect {name} to network {endpoint.network}", connect, retry=False)

    def _track_starting(self, pool: PoolPolicy, delta: int) -> None:
        with self._lock:
            self._starting[pool.name] = self._starting.get(pool.name, 0) + delta
