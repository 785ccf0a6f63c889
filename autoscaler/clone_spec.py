"""What a clone of a Compose replica is: its create body, name and networks, from a `docker inspect` of it.

Pure functions, shared by the two sides that must agree byte for byte: the Compose backend, which sends
these bodies (backends/compose_clone.py), and the socket proxy, which accepts a create or a network connect
only if it is exactly what these functions make of a container of the same service (socket_proxy/clones.py).
No Docker client, no controller state: importing this module talks to nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loguru import logger

__all__ = [
    "CLONE_LABEL",
    "CONTAINER_NUMBER_LABEL",
    "ONEOFF_LABEL",
    "OWNER_LABEL",
    "PROJECT_LABEL",
    "ROLE_LABEL",
    "SERVICE_LABEL",
    "STANDBY_QUEUE_PREFIX",
    "STANDBY_ROLE",
    "VERSION_LABEL",
    "Endpoint",
    "StandbyRefusedError",
    "clone_config",
    "connect_body",
    "create_body",
    "endpoint_config",
    "endpoints",
    "name_separator",
    "standby_command",
    "standby_config",
]

# The same values as autoscaler.backends.base / compose_model (tests/test_clone_spec.py checks they agree):
# repeated here so that the socket proxy needs nothing of the backends.
OWNER_LABEL = "autoscaler.pool"
CLONE_LABEL = "autoscaler.clone"
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
CONTAINER_NUMBER_LABEL = "com.docker.compose.container-number"
ONEOFF_LABEL = "com.docker.compose.oneoff"
VERSION_LABEL = "com.docker.compose.version"
# A warm standby (written at create: labels cannot change later) and the private queue its command consumes
# instead of the pool's, named after the container, until the controller activates it (compose_standby.py).
ROLE_LABEL = "autoscaler.role"
STANDBY_ROLE = "standby"
STANDBY_QUEUE_PREFIX = "autoscaler.standby."
_QUEUE_OPTIONS = ("-Q", "--queues")

# Container fields that belong to one container only and must not be cloned.
_PER_CONTAINER_CONFIG = ("Hostname", "MacAddress")
# Host-config fields the daemon derives itself (from Privileged and SecurityOpt systempaths=...): left out,
# so that a create never sends a /proc mask list of its own.
_DERIVED_HOST_CONFIG = ("MaskedPaths", "ReadonlyPaths")


@dataclass(frozen=True, slots=True)
class Endpoint:
    network: str
    aliases: tuple[str, ...]
    links: tuple[tuple[str, str], ...]
    driver_opts: dict[str, str] | None


def name_separator(template: dict[str, Any], project: str, service: str) -> str:
    # docker-compose v1 names replicas project_service_N, v2 project-service-N: follow the template.
    labels = template["Config"].get("Labels") or {}
    name = str(template.get("Name", "")).lstrip("/")
    number = labels.get(CONTAINER_NUMBER_LABEL, "")
    for separator in ("-", "_"):
        if name == separator.join((project, service, number)):
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
    """The clone's first network (given at create) and the others (connected before its first start)."""
    mode = str(template["HostConfig"].get("NetworkMode") or "")
    networks: dict[str, Any] = template.get("NetworkSettings", {}).get("Networks") or {}
    if mode in ("host", "none") or mode.startswith(("container:", "service:")) or not networks:
        return None, ()
    found = [_endpoint(net, networks[net], template=template, name=name) for net in sorted(networks)]
    # API < 1.44 accepts one network at create; the others are connected before the first start.
    primary = next((e for e in found if e.network == mode), found[0])
    return primary, tuple(e for e in found if e is not primary)


def clone_config(template: dict[str, Any], *, pool: str, number: int, image: str) -> dict[str, Any]:
    """The container config of a clone of `template` (a `docker inspect`): same config and host config.

    The host config is passed through whole rather than rebuilt: the daemon accepts its own inspect output,
    and every option (limits, init, tmpfs, ulimits, log config, restart policy...) is kept.
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


def endpoint_config(endpoint: Endpoint) -> dict[str, Any]:
    """An endpoint's settings as the Engine API takes them (what docker-py's create_endpoint_config makes)."""
    settings: dict[str, Any] = {}
    if endpoint.aliases:
        settings["Aliases"] = list(endpoint.aliases)
    if endpoint.links:
        settings["Links"] = [f"{c}:{a}" if a else c for c, a in sorted(endpoint.links)]
    if endpoint.driver_opts:
        settings["DriverOpts"] = endpoint.driver_opts
    return settings


def create_body(config: dict[str, Any], primary: Endpoint | None) -> dict[str, Any]:
    """The JSON body of `POST /containers/create` for a clone, as sent: top-level nulls left out."""
    body = {k: v for k, v in config.items() if v is not None}
    if primary is not None:
        body["NetworkingConfig"] = {"EndpointsConfig": {primary.network: endpoint_config(primary)}}
    return body


def connect_body(container: str, endpoint: Endpoint) -> dict[str, Any]:
    """The JSON body of `POST /networks/{network}/connect` that joins a clone to one more network."""
    return {"Container": container, "EndpointConfig": endpoint_config(endpoint)}


class StandbyRefusedError(ValueError):
    """The service's command cannot be made a standby's; the message says where (Config.Cmd[i]) and why."""


def _queue_option(arg: str) -> tuple[str, str | None] | None:
    """(option, value in the same argument or None) if `arg` is Celery's queue option, else None."""
    if arg in _QUEUE_OPTIONS:
        return arg, None
    if arg.startswith("--queues="):
        return "--queues", arg.removeprefix("--queues=")
    if arg.startswith("-Q") and not arg.startswith("--"):
        return "-Q", arg[2:]
    return None


def standby_command(command: Any, entrypoint: Any, *, name: str) -> list[str]:
    """The template's `Config.Cmd` with its one Celery queue argument (`-Q q`, `-Qq`, `--queues q`,
    `--queues=q`) replaced by the private queue `autoscaler.standby.<name>`: the standby boots consuming none
    of the pool's queues. Anything else (no `worker` sub-command, no queue argument or more than one, the
    queues set inside a shell string or by the entrypoint) is refused, saying where: a command the
    controller does not understand is never guessed at."""
    if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        raise StandbyRefusedError(f"Config.Cmd is {str(command)[:60]!r}, not a list of arguments")
    for i, arg in enumerate(entrypoint if isinstance(entrypoint, list) else []):
        if isinstance(arg, str) and (_queue_option(arg) or "-Q" in arg or "--queues" in arg):
            raise StandbyRefusedError(f"Config.Entrypoint[{i}] sets the queues: only Config.Cmd is rewritten")
    if "worker" not in command:
        raise StandbyRefusedError("Config.Cmd has no `worker` argument: not a `celery ... worker` command")
    found = [i for i, arg in enumerate(command) if _queue_option(arg)]
    if not found:
        for i, arg in enumerate(command):
            if " -Q" in arg or "--queues" in arg:
                raise StandbyRefusedError(f"Config.Cmd[{i}] sets the queues inside a shell string")
        raise StandbyRefusedError("Config.Cmd has no -Q/--queues argument (the worker would consume every queue)")
    if len(found) > 1:
        raise StandbyRefusedError(f"Config.Cmd[{found[1]}] is a second -Q/--queues argument")
    at = found[0]
    if at < command.index("worker"):
        raise StandbyRefusedError(f"Config.Cmd[{at}] sets the queues before the `worker` argument")
    option, value = _queue_option(command[at]) or ("", None)
    private = STANDBY_QUEUE_PREFIX + name
    if value is not None:
        if not value:
            raise StandbyRefusedError(f"Config.Cmd[{at}] names no queue")
        return [*command[:at], f"{option}={private}" if option == "--queues" else f"-Q{private}", *command[at + 1:]]
    if at + 1 >= len(command) or not command[at + 1] or command[at + 1].startswith("-"):
        raise StandbyRefusedError(f"Config.Cmd[{at}] ({option}) is not followed by a queue name")
    return [*command[:at + 1], private, *command[at + 2:]]


def standby_config(template: dict[str, Any], *, pool: str, number: int, image: str, name: str) -> dict[str, Any]:
    """A clone of `template` made a warm standby: the role label, and the command consuming a private queue
    (StandbyRefusedError when it cannot be rewritten). Nothing else differs from `clone_config`."""
    config = clone_config(template, pool=pool, number=number, image=image)
    config["Cmd"] = standby_command(template["Config"].get("Cmd"), template["Config"].get("Entrypoint"), name=name)
    config["Labels"] = {**config["Labels"], ROLE_LABEL: STANDBY_ROLE}
    return config
