"""Warm standbys of a Compose pool: how one is recognised, activated and returned (Celery remote control).

A standby is a clone created with the label `autoscaler.role=standby` and its command's `-Q`/`--queues`
replaced by a private queue, `autoscaler.standby.<container name>` (autoscaler.clone_spec.standby_config): it
boots, but consumes none of the pool's queues, so it can take no task. Activating it is Celery's
`add_consumer` of each of the pool's queues, addressed to that worker's node name alone; returning an idle one
is `cancel_consumer` of those queues, then `add_consumer` of its private queue.

Whether a standby was activated is this controller's own record (`StandbyBook`, kept in the pool's state as
`standbys`), never the broker's: any broker client could answer anything. The phase is written before each
remote-control call and confirmed by its reply. Only a standby whose reply never came (phase `activating` or
`returning`), and, once per leadership, every standby the record does not list as active (a controller killed
between a reply and its state write), is asked what it consumes (`active_queues`, that one worker): the answer
only chooses between the two known states, it never creates anything. Every call is fenced by the lease.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from celery import Celery
from loguru import logger

from autoscaler.backends.base import BackendError
from autoscaler.backends.compose_model import Replica
from autoscaler.clone_spec import ROLE_LABEL, STANDBY_QUEUE_PREFIX, STANDBY_ROLE
from autoscaler.policy.model import PoolPolicy

__all__ = [
    "ACTIVATING",
    "ACTIVE",
    "RETURNING",
    "CeleryStandbyControl",
    "StandbyBook",
    "StandbyControl",
    "Standbys",
    "is_standby",
    "node_name",
]

ACTIVE, ACTIVATING, RETURNING = "active", "activating", "returning"
DEFAULT_CONTROL_TIMEOUT = 1.0
_NODE_OPTIONS = ("-n", "--hostname")


def is_standby(replica: Replica) -> bool:
    """Created as a standby (the label is written at create and never changes; activated or not)."""
    return replica.labels.get(ROLE_LABEL) == STANDBY_ROLE


def private_queue(name: str) -> str:
    return STANDBY_QUEUE_PREFIX + name


def node_name(command: Sequence[str], hostname: str) -> str:
    """The Celery node name a worker started with `command` takes on host `hostname` (`-n name@%h`, default
    `celery@%h`), with Celery's own `%h`/`%n`/`%d`/`%%` expansion."""
    value = "celery@%h"
    for i, arg in enumerate(command):
        if arg in _NODE_OPTIONS and i + 1 < len(command):
            value = command[i + 1]
        elif arg.startswith("--hostname="):
            value = arg.removeprefix("--hostname=")
        elif arg.startswith("-n") and len(arg) > 2 and not arg.startswith("--"):
            value = arg[2:]
    if "@" not in value:
        value = "celery@" + value
    short, _, domain = hostname.partition(".")
    names = {"h": hostname, "n": short, "d": domain, "%": "%"}
    return re.sub(r"%([hnd%])", lambda m: names[m.group(1)], value)


class StandbyControl(Protocol):
    def add_consumer(self, node: str, queue: str) -> bool: ...
    def cancel_consumer(self, node: str, queue: str) -> bool: ...
    def active_queues(self, nodes: list[str]) -> dict[str, set[str]]: ...
    def busy(self, nodes: list[str]) -> set[str] | None: ...


def _ok(replies: Any, node: str) -> bool:
    """True if `node` answered a remote-control call without an error."""
    for reply in replies or []:
        if isinstance(reply, dict) and isinstance(reply.get(node), dict):
            return "error" not in reply[node]
    return False


class CeleryStandbyControl:
    """Remote control addressed to one worker at a time (`destination=[node]`), each call waiting for its reply
    (or `timeout`): measured 2-11 ms for `add_consumer` on this machine."""

    def __init__(self, *, broker_url: str, timeout: float = DEFAULT_CONTROL_TIMEOUT) -> None:
        self._timeout = timeout
        self._app = Celery("autoscaler-standby", broker=broker_url, set_as_current=False)
        self._app.conf.broker_connection_timeout = timeout
        self._app.conf.broker_connection_retry = False
        self._lock = threading.Lock()

    def add_consumer(self, node: str, queue: str) -> bool:
        with self._lock:
            replies = self._app.control.add_consumer(queue, destination=[node], reply=True, timeout=self._timeout)
        return _ok(replies, node)

    def cancel_consumer(self, node: str, queue: str) -> bool:
        with self._lock:
            replies = self._app.control.cancel_consumer(queue, destination=[node], reply=True, timeout=self._timeout)
        return _ok(replies, node)

    def active_queues(self, nodes: list[str]) -> dict[str, set[str]]:
        with self._lock:
            # `limit`: done as soon as every addressed worker has answered, not at the timeout.
            replies = self._app.control.inspect(destination=nodes, timeout=self._timeout,
                                                limit=len(nodes)).active_queues()
        found: dict[str, set[str]] = {}
        for node, queues in (replies or {}).items():
            if node in nodes and isinstance(queues, list):
                found[node] = {str(q.get("name")) for q in queues if isinstance(q, dict)}
        return found

    def busy(self, nodes: list[str]) -> set[str] | None:
        with self._lock:
            replies = self._app.control.inspect(destination=nodes, timeout=self._timeout, limit=len(nodes)).active()
        if not isinstance(replies, dict):
            return None
        return {str(node) for node, tasks in replies.items() if tasks}

    def close(self) -> None:
        self._app.close()


class StandbyBook:
    """Per pool: the standbys that are not plain standbys (container id -> phase). Pure bookkeeping."""

    def __init__(self) -> None:
        self._pools: dict[str, dict[str, str]] = {}
        self._unverified: dict[str, bool] = {}  # pool -> ask every standby once (a new leader)
        self._lock = threading.Lock()

    def marks(self, pool: str) -> tuple[tuple[str, str], ...]:
        with self._lock:
            return tuple(sorted(self._pools.get(pool, {}).items()))

    def restore(self, pool: str, marks: Iterable[tuple[str, str]]) -> None:
        with self._lock:
            self._pools[pool] = dict(marks)
            self._unverified[pool] = True

    def phase(self, pool: str, cid: str) -> str | None:
        with self._lock:
            return self._pools.get(pool, {}).get(cid)

    def put(self, pool: str, cid: str, phase: str | None) -> None:
        with self._lock:
            book = self._pools.setdefault(pool, {})
            if phase is None:
                book.pop(cid, None)
            else:
                book[cid] = phase

    def keep_only(self, pool: str, present: set[str]) -> None:
        with self._lock:
            book = self._pools.get(pool, {})
            for cid in [c for c in book if c not in present]:
                del book[cid]

    def take_unverified(self, pool: str) -> bool:
        with self._lock:
            return self._unverified.pop(pool, False)


class Standbys:
    """A Compose backend's standbys: which of a pool's containers are standbys, activating and returning them.

    `inspect(id)` is the Engine API's inspect (a standby's node name and memory limit come from it, once);
    `fence(what)` raises LeaseLostError once another controller leads; `read_only` (for `status`) asks no
    worker anything."""

    def __init__(
        self, control: StandbyControl | None, *, inspect: Callable[[str], dict[str, Any]],
        fence: Callable[[str], None], read_only: bool = False,
        on_count: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self._control = control
        self._inspect = inspect
        self._fence = fence
        self._read_only = read_only
        self._on_count = on_count
        self.book = StandbyBook()
        # pool -> container id -> (Celery node name, memory limit)
        self._seen: dict[str, dict[str, tuple[str, int]]] = {}

    def _nodes(self, replica: Replica) -> str:
        return self._node_and_memory(replica)[0]

    def report(self, pool: PoolPolicy, standbys: list[Replica]) -> int:
        """Bytes the standbys may hold: the sum of their memory limits (HostConfig.Memory; 0 if unlimited), also
        given to `on_count` (the metrics) with their number."""
        memory = sum(self._node_and_memory(r)[1] for r in standbys)
        if self._on_count is not None:
            self._on_count(pool.name, len(standbys), memory)
        return memory

    def _node_and_memory(self, replica: Replica) -> tuple[str, int]:
        seen = self._seen.setdefault(replica.owner or "", {})
        if replica.id not in seen:  # both fixed at create
            info = self._inspect(replica.id)
            config = info.get("Config") or {}
            command = [str(a) for a in config.get("Cmd") or []]
            seen[replica.id] = (node_name(command, str(config.get("Hostname") or replica.short_id)),
                                memory_limit(info))
        return seen[replica.id]

    def split(self, pool: PoolPolicy, running: list[Replica]) -> tuple[list[Replica], list[Replica]]:
        """(capacity, standbys) among running, not draining replicas: a labelled one is capacity once active."""
        self.book.keep_only(pool.name, {r.id for r in running})
        present, seen = {r.id for r in running}, self._seen.get(pool.name, {})
        for cid in [c for c in seen if c not in present]:
            del seen[cid]  # gone or draining: its inspect is not needed again
        capacity = [r for r in running if not is_standby(r) or self.book.phase(pool.name, r.id) == ACTIVE]
        ids = {r.id for r in capacity}
        return capacity, [r for r in running if r.id not in ids]

    def verify(self, pool: PoolPolicy, running: list[Replica]) -> None:
        """Settle standbys whose last change is unconfirmed (and, once per leadership, every labelled one not
        known active) by asking those workers what they consume; silence settles nothing."""
        if self._read_only or self._control is None:
            return
        everyone = self.book.take_unverified(pool.name)
        unsure = [r for r in running if is_standby(r) and (
            self.book.phase(pool.name, r.id) in (ACTIVATING, RETURNING)
            or (everyone and self.book.phase(pool.name, r.id) is None)
        )]
        if not unsure:
            return
        nodes = {self._nodes(r): r for r in unsure}
        self._fence(f"ask {len(nodes)} standby worker(s) of pool {pool.name} what they consume")
        try:
            answers = self._control.active_queues(list(nodes))
        except Exception as exc:  # broker down: the phases stay unsure, asked again next tick
            logger.warning("pool {}: cannot ask the standbys what they consume: {}", pool.name, exc)
            return
        for node, queues in answers.items():
            replica = nodes[node]
            phase = ACTIVE if queues & set(pool.queues) else None
            if phase != self.book.phase(pool.name, replica.id):
                logger.info("pool {}: {} consumes {}: {}", pool.name, replica.name, sorted(queues)[:5],
                            "active (capacity)" if phase else "a standby")
            missing = [q for q in pool.queues if q not in queues] if phase else []
            if missing:
                # Half activated (or half returned) when the last controller stopped: it already takes tasks,
                # so it is capacity, and the activation is finished (add_consumer of a queue it has is a no-op).
                self._fence(f"finish activating {replica.name} of pool {pool.name}")
                self.book.put(pool.name, replica.id, ACTIVATING)
                if not all(self._control.add_consumer(node, q) for q in missing):
                    continue  # still unsure: asked again next tick
            self.book.put(pool.name, replica.id, phase)

    def activate(self, pool: PoolPolicy, standbys: list[Replica], count: int) -> int:
        """Make up to `count` standbys capacity (healthy ones first, then the longest booted); how many were.
        Raises BackendError when one did not confirm."""
        if self._control is None:
            raise BackendError(f"pool {pool.name}: no Celery remote control to activate standbys with")
        done = 0
        for replica in sorted(standbys, key=lambda r: (r.health not in (None, "healthy"), r.created))[:count]:
            node = self._nodes(replica)
            self.book.put(pool.name, replica.id, ACTIVATING)  # before the call: a lost reply is asked about
            self._fence(f"activate standby {replica.name} of pool {pool.name}")
            if not all(self._control.add_consumer(node, queue) for queue in pool.queues):
                raise BackendError(f"pool {pool.name}: standby {replica.name} ({node}) did not confirm consuming "
                                   f"{', '.join(pool.queues)}; activated {done} of {count}")
            self.book.put(pool.name, replica.id, ACTIVE)
            done += 1
        return done

    def give_back(self, pool: PoolPolicy, capacity: list[Replica], count: int, busy: set[str] | None) -> list[Replica]:
        """Return up to `count` idle, once-standby replicas to standby; the ones returned."""
        if self._control is None or count <= 0:
            return []
        labelled = [r for r in capacity if is_standby(r)]
        if not labelled:
            return []
        nodes = {r.id: self._nodes(r) for r in labelled}
        if busy is None:
            self._fence(f"ask which standby workers of pool {pool.name} are busy")
            busy = self._control.busy(list(nodes.values()))
            if busy is None:
                return []  # nobody answered: idleness unknown, so none is returned (they drain instead)
        idle = [r for r in labelled if nodes[r.id] not in busy and r.short_id not in busy]
        returned: list[Replica] = []
        for replica in sorted(idle, key=lambda r: r.newest_first_key(), reverse=True)[:count]:
            node = nodes[replica.id]
            self.book.put(pool.name, replica.id, RETURNING)
            self._fence(f"return {replica.name} of pool {pool.name} to standby")
            ok = all(self._control.cancel_consumer(node, q) for q in pool.queues)
            ok = ok and self._control.add_consumer(node, private_queue(replica.name))
            if not ok:
                raise BackendError(f"pool {pool.name}: {replica.name} ({node}) did not confirm its return to standby")
            self.book.put(pool.name, replica.id, None)
            returned.append(replica)
        return returned


def memory_limit(inspect: dict[str, Any]) -> int:
    """A container's memory limit in bytes (HostConfig.Memory; 0 when unlimited)."""
    value = (inspect.get("HostConfig") or {}).get("Memory") or 0
    return value if isinstance(value, int) and value > 0 else 0
