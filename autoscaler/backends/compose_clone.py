"""Cloning a Compose replica: the create body, networks and name of a new container like the template's.

The bodies themselves are autoscaler.clone_spec's pure functions (the socket proxy judges creates with the
same ones); here: choosing the template (the service's own newest container), creating and starting.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from contextvars import copy_context
from dataclasses import dataclass
from typing import Any

import docker
from loguru import logger

from autoscaler import clone_spec
from autoscaler.backends.base import BackendError, LeaseLostError, TargetNotFoundError
from autoscaler.backends.compose_model import Replica, ServiceRef, nothing_to_clone
from autoscaler.backends.compose_standby import is_standby
from autoscaler.backends.docker_client import DockerConnection, DockerNotFoundError, untyped_api
from autoscaler.backends.start_backoff import StartBackoff
from autoscaler.clone_spec import Endpoint, StandbyRefusedError, clone_config, create_body, endpoints, standby_config
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


@dataclass(frozen=True, slots=True)
class Clone:
    """Everything needed to create one new replica."""

    name: str
    config: dict[str, Any]
    primary: Endpoint | None
    others: tuple[Endpoint, ...]


def name_separator(template: dict[str, Any], target: ServiceRef) -> str:
    return clone_spec.name_separator(template, target.project, target.service)


def with_network(clone: Clone) -> dict[str, Any]:
    """The create body: the clone's config and its first network (what the socket proxy expects exactly)."""
    return create_body(clone.config, clone.primary)


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

    def scale_up(
        self, pool: PoolPolicy, target: ServiceRef, replicas: list[Replica], *, count: int, standbys: int = 0
    ) -> None:
        """Create and start `count` replicas and `standbys` warm standbys (compose_standby.py), one round."""
        template = self._template_for(pool, target, replicas)
        image = self._image_for(template)
        separator = name_separator(template, target)
        numbers = next_numbers(replicas, count=count + standbys)
        clones = [
            self._plan_clone(template, pool=pool, target=target, number=n, separator=separator, image=image)
            for n in numbers[:count]
        ]
        refused: StandbyRefusedError | None = None
        try:
            clones += [
                self._plan_clone(template, pool=pool, target=target, number=n, separator=separator, image=image,
                                 standby=True)
                for n in numbers[count:]
            ]
        except StandbyRefusedError as exc:
            refused = exc  # the replicas are still made: only the standbys are refused, saying where
        if clones:
            self._create_round(pool, target, clones)
        if refused is not None:
            raise BackendError(
                f"{target}: no warm standby can be made of {str(template.get('Name', '')).lstrip('/')}: {refused}"
            )

    def _create_round(self, pool: PoolPolicy, target: ServiceRef, clones: list[Clone]) -> None:
        self._track_starting(pool, len(clones))
        try:
            # Each in the caller's context: an action's fence checks go on failing there once its lease term is
            # over (leader.py, Fence.acting_under). One copy per task: a context is entered by one thread at once.
            futures = [self._starter.submit(copy_context().run, self._create_and_start, target, clone)
                       for clone in clones]
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
        # A standby's own config (role label, private queue) is never a template: only the service's plain ones.
        template = self.template(target, [r for r in replicas if not is_standby(r)])
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
        standby: bool = False,
    ) -> Clone:
        name = separator.join((target.project, target.service, str(number)))
        primary, others = endpoints(template, name=name)
        config = (
            standby_config(template, pool=pool.name, number=number, image=image, name=name) if standby
            else clone_config(template, pool=pool.name, number=number, image=image)
        )
        return Clone(name=name, config=config, primary=primary, others=others)

    def _create_and_start(self, target: ServiceRef, clone: Clone) -> str:
        created = self._docker.call(
            f"create container {clone.name} for {target}",
            lambda c: untyped_api(c).create_container_from_config(with_network(clone), name=clone.name),
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
