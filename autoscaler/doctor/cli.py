"""The `autoscaler doctor` command: options, then run_doctor, then text or JSON and the exit code."""

from __future__ import annotations

import sys

import click

from autoscaler.doctor.findings import Finding, Status, exit_code
from autoscaler.doctor.output import render_json, render_text
from autoscaler.doctor.redact import printable
from autoscaler.doctor.runner import DoctorOptions, run_doctor
from autoscaler.policy.load import PolicyError, load_policy
from autoscaler.settings import SettingsError, load_settings

__all__ = ["doctor"]


@click.command()
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False),
              help="policy file (default: $AUTOSCALER_POLICY or policies/default.yaml)")
@click.option("--database-url", envvar="AUTOSCALER_DOCTOR_DATABASE_URL",
              help="PostgreSQL to check (connections now and the policy's worst case); needs psycopg")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--strict", is_flag=True, help="exit 1 on a WARN too")
@click.option("--web", "web_services", multiple=True, default=("web",), show_default=True,
              help="Compose service(s) of the web tier, compared with the workers")
@click.option("--web-connections", type=click.IntRange(0, 100_000), default=0, show_default=True,
              help="database connections the web tier may hold (processes x threads), for the worst case")
@click.option("--connections-per-process", type=click.IntRange(1, 1000), default=1, show_default=True,
              help="database connections one worker process or thread may hold (one per database alias)")
@click.option("--memory-window", type=click.FloatRange(0.0, 3600.0), default=4.0, show_default=True,
              help="seconds over which 3 memory samples are taken (longer: slower leaks show)")
@click.option("--inspect-timeout", type=click.FloatRange(0.1, 60.0), default=1.0, show_default=True,
              help="seconds to wait for the workers' answers to each inspect broadcast")
def doctor(*, policy_path: str | None, database_url: str | None, as_json: bool, strict: bool,
           web_services: tuple[str, ...], web_connections: int, connections_per_process: int,
           memory_window: float, inspect_timeout: float) -> None:
    """Check the broker, workers, containers and PostgreSQL for the seed's outages; read-only.

    Each check prints PASS, WARN or FAIL, what it saw, why it matters and the fix. Exit 0 when nothing
    FAILs (with --strict: nothing WARNs either), 1 on a FAIL, 2 when something could not be checked.
    """
    try:
        settings = load_settings(policy=policy_path)
        policy = load_policy(settings.policy)
    except SettingsError as exc:
        _cannot([f"settings: {p}" for p in exc.problems], as_json)
    except PolicyError as exc:
        _cannot([str(p) for p in exc.problems], as_json)
    findings = run_doctor(DoctorOptions(
        policy=policy, redis_url=settings.redis_url, docker_host=settings.docker_host,
        compose_project=settings.compose_project, database_url=database_url, web_services=web_services,
        web_connections=web_connections, connections_per_process=connections_per_process,
        inspect_timeout=inspect_timeout, memory_window=memory_window))
    click.echo(render_json(findings, strict=strict) if as_json else render_text(findings, strict=strict))
    sys.exit(exit_code(findings, strict=strict))


def _cannot(problems: list[str], as_json: bool) -> None:
    findings = [Finding("setup", "policy and settings", Status.UNKNOWN, printable(p, 400)) for p in problems]
    click.echo(render_json(findings) if as_json else render_text(findings), err=not as_json)
    sys.exit(2)
