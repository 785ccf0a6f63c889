"""Environment drift (the seed's import-failure case) and eager mode as the containers' environment shows it.

Drift: the containers of one pool, or web against the workers, with different DJANGO_SETTINGS_MODULE,
PYTHONPATH or image. A task routed from web runs in a worker with another settings module or code, and
fails with ImportError. Within a pool any difference FAILs; web against workers FAILs on the two variables
and WARNs on the image (a separate web image can be deliberate).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from autoscaler.doctor.containers import ContainerFacts
from autoscaler.doctor.findings import Finding, Status
from autoscaler.doctor.redact import shown_value

__all__ = ["DRIFT_VARIABLES", "EAGER_VARIABLES", "drift_findings", "eager_env_findings"]

DRIFT_VARIABLES = ("DJANGO_SETTINGS_MODULE", "PYTHONPATH")
EAGER_VARIABLES = ("CELERY_TASK_ALWAYS_EAGER", "TASK_ALWAYS_EAGER", "CELERY_ALWAYS_EAGER")
_TRUE = frozenset({"1", "true", "yes", "on", "y", "t"})
_WHY = "containers importing different code or settings fail tasks with ImportError (No module named ...)"
_FIX = "give web and every worker the same image, DJANGO_SETTINGS_MODULE and PYTHONPATH (one shared env block)"
_UNSET = "(unset)"


def _values(containers: Sequence[ContainerFacts], what: str) -> dict[str, list[str]]:
    """Value -> names of the containers with it."""
    found: dict[str, list[str]] = {}
    for c in containers:
        value = c.image_id or c.image if what == "image" else c.env.get(what, _UNSET)
        found.setdefault(value, []).append(c.name)
    return found


def _describe(what: str, values: Mapping[str, list[str]]) -> str:
    parts = []
    for value, names in sorted(values.items(), key=lambda kv: -len(kv[1]))[:4]:
        shown = value[:19] if what == "image" else shown_value(what, value)
        parts.append(f"{shown} in {', '.join(sorted(names)[:3])}{' ...' if len(names) > 3 else ''}")
    return "; ".join(parts)


def drift_findings(pools: Mapping[str, Sequence[ContainerFacts]], web: Sequence[ContainerFacts]) -> list[Finding]:
    findings: list[Finding] = []
    running = {pool: [c for c in cs if c.running] for pool, cs in pools.items()}
    for pool, containers in sorted(running.items()):
        if not containers:
            continue
        for what in (*DRIFT_VARIABLES, "image"):
            values = _values(containers, what)
            status = Status.FAIL if len(values) > 1 else Status.PASS
            count = f"{len(containers)} container{'s' if len(containers) > 1 else ''}"
            saw = (f"{count} differ: {_describe(what, values)}" if len(values) > 1
                   else f"{count}: {_describe(what, values)}")
            findings.append(Finding("environment", f"{what} within the pool", status, saw, _WHY, _FIX, f"pool {pool}"))
    workers = [c for cs in running.values() for c in cs]
    web_running = [c for c in web if c.running]
    if not web_running or not workers:
        findings.append(Finding("environment", "web vs workers", Status.PASS,
                                "no running web container found to compare (see --web)", _WHY, _FIX))
        return findings
    for what in (*DRIFT_VARIABLES, "image"):
        web_values, worker_values = _values(web_running, what), _values(workers, what)
        same = set(web_values) == set(worker_values)
        status = Status.PASS if same else Status.WARN if what == "image" else Status.FAIL
        saw = (f"web and workers alike ({_describe(what, web_values)})" if same else
               f"web: {_describe(what, web_values)}; workers: {_describe(what, worker_values)}")
        findings.append(Finding("environment", f"{what} web vs workers", status, saw, _WHY, _FIX))
    return findings


def eager_env_findings(containers: Sequence[ContainerFacts]) -> list[Finding]:
    """FAIL for a container whose environment turns eager mode on (the one signal readable from outside a
    producer: a settings module's own `task_always_eager = True` is invisible here; workers are asked too)."""
    why = "eager tasks run inside the web request instead of on a worker: the broker and the workers sit idle"
    fix = "remove CELERY_TASK_ALWAYS_EAGER (task_always_eager) outside tests"
    findings = []
    for c in containers:
        if not c.running:
            continue
        on = [f"{n}={shown_value(n, c.env[n])}" for n in EAGER_VARIABLES
              if c.env.get(n, "").strip().lower() in _TRUE]
        found = [n for n in EAGER_VARIABLES if n in c.env]
        if on:
            findings.append(Finding("eager", "eager mode (environment)", Status.FAIL, ", ".join(on), why, fix, c.name))
        else:
            saw = (f"{', '.join(found)} set, not true" if found else "no eager variable set") + \
                  "; a value inside the settings module cannot be read from outside"
            findings.append(Finding("eager", "eager mode (environment)", Status.PASS, saw, why, fix, c.name))
    return findings
