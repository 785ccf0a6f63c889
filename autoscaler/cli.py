"""The `autoscaler` command: run, status, validate, schema, doctor (and simulate, for tuning)."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import click
from loguru import logger

from autoscaler.observability.logs import configure_logging
from autoscaler.policy.load import PolicyError, load_policy, load_policy_stream
from autoscaler.policy.schema import policy_json_schema
from autoscaler.settings import Settings, SettingsError, load_settings

__all__ = ["main"]

_POLICY_HELP = "policy file (default: $AUTOSCALER_POLICY or policies/default.yaml)"


def _settings(**overrides: Any) -> Settings:
    """Settings, or exit 2 with one line per bad variable (never a traceback)."""
    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        for problem in exc.problems:
            click.echo(f"settings: {problem}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="autoscaler")
def main() -> None:
    """Queue-driven autoscaler for Celery worker pools on Docker Compose and Swarm.

    Settings come from environment variables prefixed AUTOSCALER_ (AUTOSCALER_REDIS_URL,
    AUTOSCALER_POLICY, AUTOSCALER_DRY_RUN, ...); flags override them.
    """


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
def validate(files: tuple[Path, ...]) -> None:
    """Check policy files; exit 0 if all are valid, else 1 with every problem (file:line: field: message).

    `-` reads one from standard input (e.g. `docker run -i IMAGE validate - <policy.yaml`)."""
    failed = False
    for path in files:
        try:
            policy = load_policy_stream(sys.stdin.buffer) if str(path) == "-" else load_policy(path)
        except PolicyError as exc:
            failed = True
            for problem in exc.problems:
                click.echo(str(problem), err=True)
            continue
        click.echo(f"{path}: ok ({len(policy.pools)} pools: {', '.join(p.name for p in policy.pools)})")
    sys.exit(1 if failed else 0)


@main.command()
def schema() -> None:
    """Print the JSON Schema of policy files (editors use it to complete and check them)."""
    click.echo(json.dumps(policy_json_schema(), indent=2))


@main.command()
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False), help=_POLICY_HELP)
@click.option("--dry-run/--no-dry-run", default=None, help="decide and log, never act (default: the policy's)")
@click.option("--once", is_flag=True, help="run one tick and exit")
@click.option("--interval", type=click.FloatRange(min=0.1), help="seconds between ticks (default: the policy's)")
@click.option(
    "--record",
    type=click.Path(dir_okay=False, path_type=Path),
    help="append each tick's observations as JSON lines (a trace for `autoscaler simulate`)",
)
def run(policy_path: str | None, dry_run: bool | None, once: bool, interval: float | None, record: Path | None) -> None:
    """Run the controller: observe, decide and scale every interval until SIGTERM/SIGINT.

    SIGHUP reloads the policy at once; a changed policy file is also picked up at the next tick. An
    invalid edit is logged with its errors and the last good policy stays in force.
    """
    from autoscaler.wiring import build_controller  # noqa: PLC0415 - keeps `validate`/`schema` light

    settings = _settings(policy=policy_path, dry_run=dry_run, interval=interval)
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    try:
        app = build_controller(settings, record=record)
    except PolicyError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        sys.exit(1)
    except SettingsError as exc:
        for setting in exc.problems:
            click.echo(f"settings: {setting}", err=True)
        sys.exit(2)
    stop, reload, wake = threading.Event(), threading.Event(), threading.Event()

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("received {}; stopping after the current tick", signal.Signals(signum).name)
        stop.set()
        wake.set()

    def on_hup(_signum: int, _frame: FrameType | None) -> None:
        logger.info("received SIGHUP; reloading the policy")
        reload.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    app.run(stop=stop, reload=reload, wake=wake, once=once)


@main.command()
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False), help=_POLICY_HELP)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def status(policy_path: str | None, as_json: bool) -> None:
    """Show each pool's queues, current and desired replicas and the reason, without acting."""
    from autoscaler.wiring import preview  # noqa: PLC0415

    settings = _settings(policy=policy_path)
    configure_logging(fmt=settings.log_format, level="WARNING")
    try:
        report = preview(settings)
    except PolicyError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(report))
        return
    if report.get("metric_error"):
        click.echo(f"metric source: {report['metric_error']}")
    for pool in report["pools"]:
        click.echo(pool_line(pool))
        for q in pool["queues"]:
            latency = "unknown" if q["latency_s"] is None else f"{q['latency_s']:.1f}s"
            click.echo(f"  {q['name']}: waiting={q['waiting']} unacked={q['unacked']} latency={latency}")


def pool_line(pool: dict[str, Any]) -> str:
    """`fast: current=2 standby=2 (memory limit 512 MiB) desired=2  reason`: standbys apart from capacity."""
    current = "?" if pool["current"] is None else pool["current"]
    desired = "?" if pool["desired"] is None else pool["desired"]
    standby = ""
    if pool.get("standby"):
        mib = (pool.get("standby_memory_bytes") or 0) / 2**20
        standby = f" standby={pool['standby']}" + (f" (memory limit {mib:.0f} MiB)" if mib else "")
    return f"{pool['name']}: current={current}{standby} desired={desired}  {pool['reason']}"


from autoscaler.simulate.cli import simulate  # noqa: E402 - registered last, beside the other commands

main.add_command(simulate)

from autoscaler.doctor.cli import doctor  # noqa: E402

main.add_command(doctor)

if __name__ == "__main__":  # pragma: no cover
    main()
