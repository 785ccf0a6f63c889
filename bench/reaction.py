"""Bench: how soon a burst gets workers, on the real engine and real Celery workers, mode by mode.

Run from the repository root (Docker running, base images built)::

    . scripts/images.env && .venv/bin/python bench/reaction.py [--quick] [--modes poll15,poll1] [--json FILE]

Each mode is a policy variant on the same rig: polling every 30 s (KEDA's default), 15 s (shipped), 1 s,
then push-triggered evaluation (`push: true`), and push with warm standbys (`warm: 2`, `warm: 8`). A mode
whose policy the installed autoscaler refuses (`autoscaler validate`) is skipped with a line saying so.

The rig, one Compose project per mode (bench/reaction_compose.yaml): a broker, the controller's state
Redis, and the fast pool on the stack's image and worker command (Django + Celery, 8 processes: the
stack's boot cost). The controller is `autoscaler run` from this checkout (JSON logs). Tiers as shipped
(> 500 -> 10, > 100 -> 5, < 10 -> 2) with the shipped up-cooldown; a 5 s down-cooldown and stabilization
so the pool is back to 2 soon after a burst drains; the bench waits for that before the next burst.

Per burst (2,000 tasks of 0.5 s, published at a random phase of the tick), from the queue first holding
more than 100 (LLEN sampled every 20 ms by the bench):
- decision: the controller's first scale-up action that began after the publish (its JSON log line's
  time minus its `seconds`, autoscaler/actions.py);
- first new container running: the first Docker `start` event of a pool container that did not exist
  before the burst;
- first new worker consuming: the first task started (the ledger the tasks write) by a worker that was not
  consuming the queue before the burst (Celery `active_queues`): a new replica or an activated standby;
- 10 workers consuming, from the queue first holding more than 500: the 10th distinct worker's first task.
Every burst's tasks are counted done (a set of indexes: none lost, none run twice). Per mode also the
controller's idle CPU: its process CPU time over --idle-seconds with no load, in % of one core.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import docker
import redis
from celery import Celery
from reaction_report import FULL, METRICS, MIN, MODES, Mode, estimate_seconds, policy_text, summarize, table
from reaction_rig import (
    QUEUE,
    REPO,
    ControllerProcess,
    Project,
    QueueSampler,
    StartEvents,
    consuming_workers,
    process_cpu_seconds,
    sigterm_as_interrupt,
)

__all__ = ["main"]

DEFAULT_STACK_IMAGE = "autoscaler-bench/stack:reaction"
STEADY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Config:
    tasks: int
    task_seconds: float
    idle_seconds: float
    n_poll: int
    n_push: int
    stack_image: str
    seed: int


def validate(policy: Path) -> tuple[bool, str]:
    """`autoscaler validate` from this checkout: (accepted, its first complaint)."""
    proc = subprocess.run(
        [sys.executable, "-m", "autoscaler.cli", "validate", str(policy)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=False,
    )
    return proc.returncode == 0, (proc.stderr.strip().splitlines() or [""])[0]


def resolve_policy(mode: Mode, project: str, path: Path) -> str | None:
    """Write the mode's policy to `path`; None (and a printed line) when the autoscaler refuses it.

    A polling mode says `push: false`; an autoscaler without the `push` field refuses that, and polling is
    then all it does, so the policy without the field stands for the mode.
    """
    path.write_text(policy_text(mode, project, with_push_field=True))
    ok, complaint = validate(path)
    if ok:
        return None
    if mode.polling and "push" in complaint:
        path.write_text(policy_text(mode, project, with_push_field=False))
        ok_without, _ = validate(path)
        if ok_without:
            print(f"  {mode.title}: this autoscaler has no `push` field (polling is all it does): policy without it")
            return None
    return complaint


def wait_steady(app: Celery, project: Project, mode: Mode, broker: redis.Redis) -> set[str]:
    """Wait until the pool is back at rest: MIN workers consuming, `warm` more answering (standbys), every
    running container answering (none booting), the queue empty; twice in a row. Returns the consuming hosts."""
    deadline = time.monotonic() + STEADY_TIMEOUT_S
    streak, last = 0, ""
    while time.monotonic() < deadline:
        answered, consuming = consuming_workers(app)
        running = project.running_ids()
        waiting = int(broker.llen(QUEUE))
        ok = (len(consuming) == MIN and len(answered) - len(consuming) >= mode.warm
              and len(answered) == len(running) and waiting == 0)
        last = f"{len(consuming)} consuming, {len(answered)} answering, {len(running)} running, {waiting} waiting"
        streak = streak + 1 if ok else 0
        if streak >= 2:
            return consuming
        time.sleep(1.0)
    raise RuntimeError(f"the pool did not come back to rest within {STEADY_TIMEOUT_S:.0f}s ({last})")


def publish(app: Celery, burst: str, count: int, seconds: float) -> None:
    with app.producer_or_acquire() as producer:
        for index in range(count):
            app.send_task("bench.work", args=[burst, index, seconds], queue=QUEUE, producer=producer)


def wait_done(ledger: redis.Redis, burst: str, count: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    done = 0
    while time.monotonic() < deadline:
        done = int(ledger.scard(f"bench:{burst}:done"))
        if done >= count:
            return done
        time.sleep(0.5)
    return done


def leader_ttl(mode: Mode) -> float:
    """The lease's TTL: the default 1.5 intervals, but at least 15 s. With a 1 s interval the default lease
    expires during a scale-up that takes 2-5 s on this machine, and the leader then skips the state write
    (the up-cooldown's record among it): that is not what this bench measures (the report names it)."""
    return max(1.5 * mode.interval, 15.0)


def _since(value: float | None, origin: float | None) -> float | None:
    return None if value is None or origin is None else round(value - origin, 3)


class ModeRun:
    """One mode: its project up, its controller running, its bursts measured, then all of it removed."""

    def __init__(self, mode: Mode, config: Config, client: docker.DockerClient, log_dir: Path, run_id: str) -> None:
        self.mode, self.config, self.client, self.log_dir = mode, config, client, log_dir
        self.project = Project(name=f"asbenchreact{run_id}{mode.key}", stack_image=config.stack_image,
                               client=client)
        self.n = config.n_push if mode.push else config.n_poll

    def run(self) -> dict[str, Any]:
        mode = self.mode
        result: dict[str, Any] = {"mode": mode.key, "title": mode.title, **asdict(mode), "n": self.n}
        policy = self.log_dir / f"policy-{mode.key}.yaml"
        refused = resolve_policy(mode, self.project.name, policy)
        if refused is not None:
            print(f"  SKIPPED {mode.title}: the installed autoscaler refuses its policy ({refused})")
            return {**result, "skipped": refused}
        result["policy"] = policy.read_text()
        controller: ControllerProcess | None = None
        events: StartEvents | None = None
        app: Celery | None = None
        try:
            self.project.up()
            broker_url = f"redis://127.0.0.1:{self.project.port('redis')}/0"
            state_url = f"redis://127.0.0.1:{self.project.port('state')}/0"
            app = Celery("reaction-bench", broker=broker_url)
            broker = redis.Redis.from_url(broker_url)
            ledger = redis.Redis.from_url(broker_url.removesuffix("/0") + "/1")
            events = StartEvents(self.client, self.project.name)
            controller = ControllerProcess(policy, broker_url=broker_url, state_url=state_url,
                                           leader_ttl=leader_ttl(mode),
                                           log_path=self.log_dir / f"controller-{mode.key}.log")
            wait_steady(app, self.project, mode, broker)
            result["idle_cpu_percent"] = self.idle_cpu(controller)
            rng = random.Random(f"{self.config.seed}-{mode.key}")
            # Stratified phases: burst i waits (slot + U(0, 1)) / n of an interval after the pool is at
            # rest, slots shuffled, so a few bursts still cover the whole tick.
            slots = list(range(self.n))
            rng.shuffle(slots)
            bursts = []
            for index, slot in enumerate(slots):
                delay = (slot + rng.random()) / self.n * mode.interval
                burst = self.burst(index, delay, app, broker, ledger, controller, events)
                bursts.append(burst)
                print(f"  {mode.title} burst {index + 1}/{self.n}: " + ", ".join(
                    f"{key.removesuffix('_s')} {'-' if burst[key] is None else format(burst[key], '.2f')}"
                    for key, _ in METRICS) + f"; phase {burst['phase_s']}, publish {burst['publish_s']}, "
                      f"boot {_span(burst['boot_s'])}, lost {burst['lost']}", flush=True)
            result["bursts"] = bursts
            result["summary"] = {key: summarize([b[key] for b in bursts]) for key, _ in METRICS}
            result["lost"] = sum(b["lost"] for b in bursts)
            result["duplicates"] = sum(b["duplicates"] for b in bursts)
            return result
        finally:
            if controller is not None:
                controller.stop()
            if events is not None:
                events.close()
            if app is not None:
                app.close()
            self.project.down()

    def idle_cpu(self, controller: ControllerProcess) -> float:
        before_actions = len(controller.actions_up("fast", since=0))
        cpu0, wall0 = process_cpu_seconds(controller.proc.pid), time.monotonic()
        time.sleep(self.config.idle_seconds)
        cpu1, wall1 = process_cpu_seconds(controller.proc.pid), time.monotonic()
        if len(controller.actions_up("fast", since=0)) != before_actions:
            print(f"  note: {self.mode.title} scaled up during the idle measurement")
        percent = round(100 * (cpu1 - cpu0) / (wall1 - wall0), 2)
        print(f"  {self.mode.title}: controller idle CPU {percent} % of one core over {wall1 - wall0:.0f} s",
              flush=True)
        return percent

    def burst(self, index: int, delay: float, app: Celery, broker: redis.Redis, ledger: redis.Redis,
              controller: ControllerProcess, events: StartEvents) -> dict[str, Any]:
        cfg = self.config
        consuming = wait_steady(app, self.project, self.mode, broker)
        known = {c.id for c in self.project.containers()}
        time.sleep(delay)
        burst = f"{self.mode.key}-{index}-{int(time.time())}"
        with QueueSampler(_url(broker), (100, 500)) as sampler:
            published_at = time.time()
            publish(app, burst, cfg.tasks, cfg.task_seconds)
            published_s = time.time() - published_at
            done = wait_done(ledger, burst, cfg.tasks, timeout=120 + cfg.tasks * cfg.task_seconds / 8)
        t100, t500 = sampler.first_above.get(100), sampler.first_above.get(500)
        firsts = {host.decode(): float(t) for host, t in ledger.hgetall(f"bench:{burst}:first").items()}
        runs = int(ledger.get(f"bench:{burst}:runs") or 0)
        actions = controller.actions_up("fast", since=published_at - 0.5)
        new_workers = [t for host, t in firsts.items() if host not in consuming]
        by_start = sorted(firsts.values())
        started = events.new_since(published_at - 0.5, known)
        # Boot: from a new container's start to its first task (its hostname is its short id).
        boot_s = [_since(firsts.get(cid[:12]), t) for t, cid in started]
        boots = [{"host": cid[:12], "started_s": _since(t, t100), "first_task_s": _since(firsts.get(cid[:12]), t100),
                  "boot_s": boot} for (t, cid), boot in zip(started, boot_s, strict=True)]
        ticks = [t for t in controller.tick_times("fast") if t100 is not None and t <= t100]
        return {
            "burst": burst,
            "delay_s": round(delay, 3),
            "phase_s": None if not ticks or t100 is None else round(t100 - ticks[-1], 2),
            "publish_s": round(published_s, 3),
            "queue_peak": sampler.peak,
            "decision_s": _since(actions[0]["start"] if actions else None, t100),
            "first_container_s": _since(started[0][0] if started else None, t100),
            "first_worker_s": _since(min(new_workers) if new_workers else None, t100),
            "full_count_s": _since(by_start[FULL - 1] if len(by_start) >= FULL else None, t500),
            "actions": [{"at_s": _since(a["start"], t100), "current": a.get("current"),
                         "desired": a.get("desired"), "seconds": a.get("seconds")} for a in actions],
            "boots": boots,
            "boot_s": summarize(boot_s),
            "workers_used": len(firsts),
            "lost": cfg.tasks - done,
            "duplicates": max(runs - done, 0),
        }


def _span(summary: dict[str, Any]) -> str:
    return f"{summary['min']:.1f}-{summary['max']:.1f}" if summary.get("n") else "-"


def _url(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


def ensure_image(client: docker.DockerClient, tag: str, *, rebuild: bool) -> None:
    """The stack's worker image from this checkout (stack/Dockerfile), built when missing or asked."""
    if not rebuild:
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.get(tag)
            return
    python = os.environ.get("PYTHON_IMAGE", "python:3.12-slim")
    build_args = ["--build-arg", f"PYTHON_IMAGE={python}"]
    if os.environ.get("PYTHON_BUILD_IMAGE"):
        build_args += ["--build-arg", f"PYTHON_BUILD_IMAGE={os.environ['PYTHON_BUILD_IMAGE']}"]
    print(f"building {tag} from stack/Dockerfile ...", flush=True)
    subprocess.run(["docker", "build", "-q", "-f", "stack/Dockerfile", *build_args, "-t", tag, "."],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    keys = [m.key for m in MODES]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(keys), help=f"comma-separated, of {', '.join(keys)} (default all)")
    parser.add_argument("--n-poll", type=int, default=5, help="bursts per polling mode (default 5)")
    parser.add_argument("--n-push", type=int, default=10, help="bursts per push mode (default 10)")
    parser.add_argument("--quick", action="store_true", help="2 bursts per mode: a smoke check, not a result")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per burst (default 2000)")
    parser.add_argument("--task-seconds", type=float, default=0.5, help="each task's sleep (default 0.5)")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle CPU window per mode (default 60)")
    parser.add_argument("--stack-image", default=DEFAULT_STACK_IMAGE, help="worker image (stack/Dockerfile)")
    parser.add_argument("--build", action="store_true", help="rebuild the worker image from this checkout")
    parser.add_argument("--seed", type=int, default=19, help="seed of the burst phases")
    parser.add_argument("--log-dir", type=Path, help="keep policies and controller logs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write every burst and the summaries as JSON")
    args = parser.parse_args(argv)
    unknown = set(args.modes.split(",")) - set(keys)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {keys}")
    if args.quick:
        args.n_poll = args.n_push = 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = Config(tasks=args.tasks, task_seconds=args.task_seconds, idle_seconds=args.idle_seconds,
                    n_poll=args.n_poll, n_push=args.n_push, stack_image=args.stack_image, seed=args.seed)
    modes = [m for m in MODES if m.key in args.modes.split(",")]
    estimate = sum(estimate_seconds(m, config.n_push if m.push else config.n_poll, tasks=config.tasks,
                                    task_seconds=config.task_seconds, idle_seconds=config.idle_seconds)
                   for m in modes)
    print(f"reaction bench: {len(modes)} modes, {config.tasks} x {config.task_seconds} s tasks per burst, "
          f"n={config.n_poll} polling / {config.n_push} push; estimated {estimate / 60:.0f} min", flush=True)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="reaction-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    client = docker.from_env(timeout=120)
    run_id = os.urandom(3).hex()
    results: list[dict[str, Any]] = []
    interrupted = False
    started = time.monotonic()
    with sigterm_as_interrupt():
        try:
            ensure_image(client, config.stack_image, rebuild=args.build)
            for mode in modes:
                print(f"mode {mode.title}:", flush=True)
                try:
                    results.append(ModeRun(mode, config, client, log_dir, run_id).run())
                except (RuntimeError, docker.errors.DockerException, redis.RedisError) as exc:
                    print(f"  FAILED {mode.title}: {exc}", flush=True)
                    results.append({"mode": mode.key, "title": mode.title, "skipped": f"failed: {exc}"})
        except KeyboardInterrupt:
            interrupted = True
            print("interrupted: everything the bench started is removed", file=sys.stderr)
        finally:
            client.close()
    took = time.monotonic() - started
    header = (f"Reaction, {datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} CPUs ({platform.machine()}), "
              f"bursts of {config.tasks} x {config.task_seconds} s tasks; took {took / 60:.1f} min")
    print(f"\n{header}\n\n{table(results)}\n\npolicies and controller logs: {log_dir}")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "config": asdict(config), "modes": results},
                                        indent=2, default=str) + "\n")
    if interrupted:
        sys.exit(130)
    if any(r.get("lost") for r in results if not r.get("skipped")):
        sys.exit("tasks were lost: see the per-burst lines above")


if __name__ == "__main__":
    main()
