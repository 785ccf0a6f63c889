"""Routing, eager workers and prefetch hoarding: the live workers against the queues and the pools.

* a queue with waiting work that no live worker consumes: the seed's "pending forever" (FAIL; WARN when it
  is the queue of a pool that runs no container now, which the autoscaler is about to start);
* a pool's container whose worker does not consume the pool's queues (workers are matched to containers by
  the host part of their node name, `-n name@%h`, against the container's hostname, name or short id);
* a worker with task_always_eager on (from its `conf` reply);
* unacked messages far above what the consumers may prefetch (concurrency x prefetch multiplier): beyond
  that bound they are not prefetched work but hoarded or stranded, and hidden from a `waiting` metric.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from autoscaler.doctor.containers import ContainerFacts
from autoscaler.doctor.findings import Finding, Status
from autoscaler.doctor.redact import printable
from autoscaler.doctor.workers import WorkerFacts
from autoscaler.policy.model import PoolPolicy
from autoscaler.types import QueueStats

__all__ = ["HOARD_FACTOR", "HOARD_SLACK", "eager_worker_findings", "pool_worker_map", "prefetch_findings",
           "routing_findings"]

HOARD_FACTOR = 2  # unacked above twice the prefetch bound ...
HOARD_SLACK = 10  # ... and at least this many over it (a few ETA tasks are normal)
_PENDING_WHY = "tasks in a queue no worker consumes stay PENDING forever, with no error anywhere"


def worker_for(container: ContainerFacts, workers: Mapping[str, WorkerFacts]) -> list[WorkerFacts]:
    keys = {container.hostname, container.name, container.id[:12]} - {""}
    return [w for w in workers.values() if w.host in keys]


def pool_worker_map(pools: Mapping[str, Sequence[ContainerFacts]],
                    workers: Mapping[str, WorkerFacts]) -> dict[str, list[WorkerFacts]]:
    return {pool: [w for c in cs if c.running for w in worker_for(c, workers)] for pool, cs in pools.items()}


def routing_findings(policy_pools: Sequence[PoolPolicy], pools: Mapping[str, Sequence[ContainerFacts]],
                     workers: Mapping[str, WorkerFacts], queues: Mapping[str, QueueStats]) -> list[Finding]:
    findings: list[Finding] = []
    consumed = {q for w in workers.values() for q in (w.queues or ())}
    pool_of_queue = {q: p for p in policy_pools for q in p.queues}
    fix = "make task_routes and the workers' -Q agree (celery inspect active_queues shows what each consumes)"
    for name, stats in sorted(queues.items()):
        if stats.error is not None:
            findings.append(Finding("routing", "queue consumed", Status.WARN, f"cannot read: {printable(stats.error)}",
                                    _PENDING_WHY, fix, f"queue {name}"))
            continue
        owner = pool_of_queue.get(name)
        if name in consumed:
            findings.append(Finding("routing", "queue consumed", Status.PASS,
                                    f"{stats.waiting} waiting; consumed by a live worker", _PENDING_WHY, fix,
                                    f"queue {name}"))
        elif stats.waiting == 0:
            findings.append(Finding("routing", "queue consumed", Status.PASS, "0 waiting; no live worker consumes it",
                                    _PENDING_WHY, fix, f"queue {name}"))
        else:
            running = owner is not None and any(c.running for c in pools.get(owner.name, ()))
            scalable = owner is not None and not running and owner.max > 0
            status = Status.WARN if scalable else Status.FAIL
            if owner is None:
                note = " (no pool of the policy names it)"
            elif scalable:
                note = f" (pool {owner.name} runs no container: the autoscaler should start one)"
            else:
                note = f" (pool {owner.name}'s workers do not consume it)"
            findings.append(Finding("routing", "queue consumed", status,
                                    f"{stats.waiting} waiting and no live worker consumes it{note}",
                                    _PENDING_WHY, fix, f"queue {name}"))
    for pool in policy_pools:
        for container in pools.get(pool.name, ()):
            if not container.running:
                continue
            answered = worker_for(container, workers)
            subject = f"pool {pool.name}: {container.name}"
            if not answered:
                findings.append(Finding(
                    "routing", "pool consumes its queues", Status.WARN,
                    "no Celery worker answered from this container (starting, another broker, or a -n name "
                    "without %h)", _PENDING_WHY, "name workers -n NAME@%h and give them the same broker URL",
                    subject))
                continue
            mine = set().union(*(w.queues or frozenset() for w in answered))
            missing = sorted(set(pool.queues) - mine)
            status = Status.FAIL if missing else Status.PASS
            saw = (f"consumes {', '.join(sorted(mine)[:8]) or 'nothing'}; not {', '.join(missing)}" if missing
                   else f"consumes {', '.join(sorted(mine)[:8])}")
            findings.append(Finding("routing", "pool consumes its queues", status, saw, _PENDING_WHY,
                                    f"start the pool's workers with -Q {','.join(pool.queues)}", subject))
    return findings


def eager_worker_findings(workers: Mapping[str, WorkerFacts]) -> list[Finding]:
    why = "an eager app runs tasks in the calling process: anything this worker sends never reaches the queue"
    fix = "remove task_always_eager (CELERY_TASK_ALWAYS_EAGER) from the worker's settings"
    findings = []
    for node, worker in sorted(workers.items()):
        if worker.always_eager is None:
            findings.append(Finding("eager", "eager mode (worker conf)", Status.WARN, "did not answer `conf`", why,
                                    fix, node))
        else:
            status = Status.FAIL if worker.always_eager else Status.PASS
            findings.append(Finding("eager", "eager mode (worker conf)", status,
                                    f"task_always_eager {'on' if worker.always_eager else 'off'}", why, fix, node))
    return findings


def prefetch_findings(policy_pools: Sequence[PoolPolicy], pool_workers: Mapping[str, Sequence[WorkerFacts]],
                      queues: Mapping[str, QueueStats]) -> list[Finding]:
    why = "prefetched messages sit in unacked, not in the queue: a `waiting` metric misses that backlog"
    fix = "worker_prefetch_multiplier = 1 (and metric: waiting_unacked in the policy)"
    findings = []
    for pool in policy_pools:
        workers = pool_workers.get(pool.name, [])
        unacked = sum(queues[q].unacked for q in pool.queues if q in queues and queues[q].unacked_error is None)
        if not workers:
            continue
        known = [w for w in workers if w.concurrency and w.prefetch_multiplier]
        bound = sum((w.concurrency or 0) * (w.prefetch_multiplier or 0) for w in known)
        multipliers = sorted({w.prefetch_multiplier for w in known if w.prefetch_multiplier})
        hoarding = len(known) == len(workers) and unacked > HOARD_FACTOR * bound and unacked >= bound + HOARD_SLACK
        status = Status.WARN if hoarding or any(m > 1 for m in multipliers) else Status.PASS
        saw = (f"{unacked} unacked; {len(workers)} workers may hold {bound} (concurrency x prefetch multiplier "
               f"{'/'.join(map(str, multipliers)) or '?'}; warn above {HOARD_FACTOR}x that and +{HOARD_SLACK}, "
               "or a multiplier above 1)")
        findings.append(Finding("prefetch", "prefetch hoarding", status, saw, why, fix, f"pool {pool.name}"))
    return findings
