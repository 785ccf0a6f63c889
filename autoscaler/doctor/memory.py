"""Worker memory (the seed's OOM case): a memory limit, memory in use, growth, and child recycling.

* no memory limit -> WARN: a leaking worker takes the host's memory instead of being OOM-killed alone;
* in use (usage minus inactive file cache, as `docker stats` shows) above 1 GiB -> WARN (the seed's alert);
* growing: every sample above the one before and the last more than GROWTH_PERCENT above the first ->
  WARN. The default is 3 samples 2 s apart (a 4 s window: only a fast leak shows; --memory-window widens it);
* prefork without max-tasks-per-child (and without max-memory-per-child) -> WARN: children are never
  recycled. Read from the worker's `stats` (the pool as it runs: command line or configuration alike); when
  no worker answers from the container, from its command line. threads, solo, gevent and eventlet pools
  run tasks in the main process: there is no child to recycle, so only the memory limit guards them (PASS
  with that said).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence

from autoscaler.doctor.containers import ContainerFacts
from autoscaler.doctor.findings import Finding, Status
from autoscaler.doctor.routing import worker_for
from autoscaler.doctor.workers import WorkerFacts

__all__ = ["GROWTH_PERCENT", "RSS_WARN_BYTES", "is_growing", "memory_findings"]

RSS_WARN_BYTES = 1 << 30
GROWTH_PERCENT = 10.0
_WHY = "workers grow (100 MB to 800 MB+ over days) until Docker OOM-kills them mid-task"
_MAX_TASKS = re.compile(r"--max-tasks-per-child(=|$)|--maxtasksperchild(=|$)|--max-memory-per-child(=|$)")
_THREADED = re.compile(r"^(--pool=|-P)?(threads|solo|gevent|eventlet)$")


def is_growing(samples: Sequence[int], *, percent: float = GROWTH_PERCENT) -> bool:
    """At least 3 samples, each above the one before, the last more than `percent` % above the first."""
    if len(samples) < 3 or samples[0] <= 0:
        return False
    rising = all(b > a for a, b in itertools.pairwise(samples))
    return rising and (samples[-1] - samples[0]) * 100.0 > percent * samples[0]


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _recycling(container: ContainerFacts, workers: Sequence[WorkerFacts]) -> Finding:
    subject = container.name
    fix = "--max-tasks-per-child=500 (worker_max_tasks_per_child) and worker_max_memory_per_child"
    if workers:
        kinds = {w.pool for w in workers}
        if kinds & {"threads", "solo", "gevent", "eventlet"} and "prefork" not in kinds:
            return Finding("memory", "child recycling", Status.PASS,
                           f"{'/'.join(sorted(kinds))} pool: tasks run in the main process, no child to recycle; "
                           "the memory limit is its guard", _WHY, "a memory limit", subject)
        limits = [w.max_tasks_per_child for w in workers]
        memory = [w.max_memory_per_child for w in workers]
        if all(limits) or all(memory):
            shown = ", ".join(f"max-tasks-per-child {t or 'unset'}, max-memory-per-child {m or 'unset'}"
                              for t, m in zip(limits, memory, strict=True))
            return Finding("memory", "child recycling", Status.PASS, f"worker stats: {shown}", _WHY, fix, subject)
        return Finding("memory", "child recycling", Status.WARN,
                       "worker stats: prefork children are never recycled (no max-tasks-per-child)", _WHY, fix,
                       subject)
    if any(_THREADED.match(arg) for arg in container.command):
        return Finding("memory", "child recycling", Status.PASS,
                       "command line runs a threads/solo/gevent pool (no worker answered): no child to recycle",
                       _WHY, "a memory limit", subject)
    if any(_MAX_TASKS.search(arg) for arg in container.command):
        return Finding("memory", "child recycling", Status.PASS,
                       "command line sets --max-tasks-per-child (no worker answered to confirm)", _WHY, fix, subject)
    return Finding("memory", "child recycling", Status.WARN,
                   "no worker answered and the command line sets no --max-tasks-per-child "
                   "(the setting may be in the app's configuration: not readable without an answer)",
                   _WHY, fix, subject)


def memory_findings(pools: Mapping[str, Sequence[ContainerFacts]], samples: Mapping[str, Sequence[int]],
                    workers: Mapping[str, WorkerFacts], *, window: float) -> list[Finding]:
    findings: list[Finding] = []
    for _pool, containers in sorted(pools.items()):
        for c in containers:
            if not c.running:
                continue
            if c.memory_limit:
                findings.append(Finding("memory", "memory limit", Status.PASS, f"limit {_mib(c.memory_limit)}", _WHY,
                                        "mem_limit: 1536m", c.name))
            else:
                findings.append(Finding("memory", "memory limit", Status.WARN,
                                        "no memory limit: a leak takes the host's memory, not just this worker's",
                                        _WHY, "mem_limit (Compose) or deploy.resources.limits.memory", c.name))
            series = list(samples.get(c.id, ()))
            if not series:
                findings.append(Finding("memory", "memory in use", Status.WARN, "no stats sample could be read",
                                        _WHY, "", c.name))
            else:
                high = series[-1] > RSS_WARN_BYTES
                growing = is_growing(series)
                status = Status.WARN if high or growing else Status.PASS
                trend = " ".join(_mib(s) for s in series)
                saw = (f"{trend} over {len(series)} samples in {window:.0f} s"
                       f"{'; above 1 GiB' if high else ''}{'; growing' if growing else ''} (warn above 1 GiB, or "
                       f"each sample higher and +{GROWTH_PERCENT:.0f} % in all)")
                findings.append(Finding("memory", "memory in use", status, saw, _WHY,
                                        "max-tasks-per-child / max-memory-per-child; find the leak", c.name))
            findings.append(_recycling(c, worker_for(c, workers)))
    return findings
