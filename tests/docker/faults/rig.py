"""The fault suite's rig: a real Celery app on Docker, a controller process, a burst, and the tally.

Everything is real: the broker and the ledger are Redis containers, the workers are Celery workers in
containers that the controller (an `autoscaler run` process, its state in the host's Redis like a deployed
one's separate state Redis) scales through the Docker engine. The tasks report to the ledger by task id,
so after a fault every published task is accounted for: completed once, redelivered, or lost.
"""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import redis
from celery import Celery
from dockertest import ComposeProject, start_controller, wait_until

POLICY = """\
interval: 1s
pools:
  fast:
    target: {{compose: {{service: worker, project: {project}}}}}
    queues: [fast]
    min: 1
    max: 4
    tiers: [{{above: 8, replicas: 4}}, {{above: 2, replicas: 2}}, {{below: 1, replicas: 1}}]
    cooldown: {{up: 0s, down: 4s}}
    stabilization: 3s
    stop_timeout: 30s
"""
ACTION = re.compile(r"scaled fast from (\d+) to (\d+)")


@dataclass
class Controller:
    """An `autoscaler run` process whose output is read as it comes, each line with its arrival time."""

    process: subprocess.Popen[str]
    lines: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, pattern: str, *, after: float = 0.0) -> tuple[float, str] | None:
        found = re.compile(pattern)
        return next(((t, line) for t, line in list(self.lines) if t >= after and found.search(line)), None)

    def actions(self) -> list[tuple[float, int, int]]:
        return [(t, int(m[1]), int(m[2])) for t, line in list(self.lines) if (m := ACTION.search(line))]

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a test that failed with it stopped still ends it soon
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._reader.join(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


class Delivery(NamedTuple):
    host: str  # the container's hostname: its id's first 12 characters
    pid: int  # the pool process that ran it
    at: float  # when it started (the worker's clock: the host's)


@dataclass
class Tally:
    published: int
    completed: int
    redelivered: int
    lost: int
    duplicated: int  # completed more than once: allowed only for a redelivered task


@dataclass
class Rig:
    project: ComposeProject
    state_url: str
    policy: Path
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    controllers: list[Controller] = field(default_factory=list)
    published: list[str] = field(default_factory=list)

    @property
    def broker_url(self) -> str:
        return f"redis://{self.project.env['FAULTS_BROKER_IP']}:6379/0"

    @property
    def ledger(self) -> redis.Redis:
        # A fixed address too: the ledger comes back with the engine after a dockerd restart.
        return redis.Redis.from_url(f"redis://{self.project.env['FAULTS_LEDGER_IP']}:6379/0", socket_timeout=10)

    def write_policy(self, text: str | None = None) -> None:
        self.policy.write_text(text if text is not None else POLICY.format(project=self.project.name))

    def start_controller(self, *args: str) -> Controller:
        controller = Controller(
            start_controller(self.policy, self.broker_url, *args, env={"AUTOSCALER_STATE_REDIS_URL": self.state_url})
        )
        self.controllers.append(controller)
        return controller

    def publish(self, count: int, seconds: float, padding: str = "") -> list[str]:
        """`count` real Celery tasks of `seconds` each (and `padding` to weigh), on the pool's queue."""
        app = Celery("faults-producer", broker=self.broker_url)
        ids = [uuid.uuid4().hex for _ in range(count)]
        with app.producer_or_acquire() as producer:
            for task_id in ids:
                app.send_task("astest.job", args=(self.run, seconds, padding), queue="fast", task_id=task_id,
                              producer=producer)
        app.close()
        self.published.extend(ids)
        return ids

    def running(self) -> int:
        return len(self.project.running_ids("worker"))

    def tally(self) -> Tally:
        ledger = self.ledger
        started = {k.decode(): int(v) for k, v in ledger.hgetall(f"{self.run}:started").items()}
        done = {k.decode(): int(v) for k, v in ledger.hgetall(f"{self.run}:done").items()}
        ledger.close()
        ids = self.published
        return Tally(
            published=len(ids),
            completed=sum(1 for i in ids if done.get(i, 0) >= 1),
            redelivered=sum(1 for i in ids if started.get(i, 0) > 1),
            lost=sum(1 for i in ids if done.get(i, 0) == 0),
            duplicated=sum(1 for i in ids if done.get(i, 0) > 1 and started.get(i, 0) <= 1),
        )

    def wait_all_done(self, timeout: float) -> Tally:
        wait_until(lambda: self.tally().completed == len(self.published) or None, timeout=timeout,
                   what=f"all {len(self.published)} tasks to complete", interval=1)
        return self.tally()

    def deliveries(self, task_id: str) -> list[Delivery]:
        """Each delivery of `task_id` as the task recorded it when it started, in order."""
        ledger = self.ledger
        rows = [row.decode().split() for row in ledger.lrange(f"{self.run}:where", 0, -1)]
        ledger.close()
        return [Delivery(row[1], int(row[2]), float(row[3])) for row in rows if row[0] == task_id]

    def close(self) -> None:
        for number, controller in enumerate(self.controllers):
            controller.stop()
            # Shown with a failing test's captured output.
            print(f"---- controller {number} ----\n{controller.output()[-6000:]}")


@dataclass
class Row:
    fault: str
    tally: Tally
    actions: int
    reversals: int
    recover_s: float | None
    operator_saw: str


ROWS: list[Row] = []


class Report:
    def add(self, fault: str, tally: Tally, *, actions: int, reversals: int, recover_s: float | None,
            operator_saw: str) -> None:
        # The log line without its time and level: what it says is the point.
        saw = re.sub(r"^\d{4}-\d\d-\d\d \S+ [A-Z]+\s+", "", operator_saw.strip())
        ROWS.append(Row(fault, tally, actions, reversals, recover_s, saw))


def reversals(actions: list[tuple[float, int, int]]) -> int:
    """How often the direction of consecutive actions changed (a burst's up then down is one)."""
    directions = [1 if new > old else -1 for _, old, new in actions if new != old]
    return sum(1 for a, b in itertools.pairwise(directions) if a != b)

