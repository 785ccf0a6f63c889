"""The install branch of scripts/docker-up.sh, run where Docker is absent: a fresh Debian machine in a container.

A machine that already has Docker (every developer's, and CI's after its first run) never takes this
branch, so a green suite there says nothing about it: the first session's `$SUDO -E apt-get` broke it for
root and nobody saw. Here a privileged container of the local Debian base image plays the new machine
(no Docker, no procps, apt reachable) and runs the real script twice over:

* as a user who may sudo: the script installs docker.io and a Compose with apt through sudo, starts
  dockerd through sudo (so `$!` is sudo's pid, not the daemon's), adds the user to the `docker` group and
  exits 3 saying how to use it now; under `sg docker` it then finds the engine and reports it;
* again as that user and as root: nothing is installed twice and the running engine is reused.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from docker.models.containers import Container
from dockertest import unique_name

from tests.docker.conftest import DockerEnv

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
# The host's apt configuration, lent to the container for the run (never baked into an image).
APT_DIRS = ("/etc/apt/sources.list.d", "/etc/apt/apt.conf.d", "/etc/apt/auth.conf.d")


def _sh(box: Container, script: str, *, user: str = "root") -> tuple[int, str]:
    code, output = box.exec_run(["bash", "-c", script], user=user, environment={"LANG": "C.UTF-8"})
    return int(code), output.decode(errors="replace")


@pytest.fixture(scope="module")
def machine(docker_env: DockerEnv) -> Iterator[Container]:
    """A new machine: Debian bookworm, apt reachable, no Docker, a user `dev` who may sudo."""
    client = docker.from_env(timeout=120)
    volumes = {str(REPO): {"bind": "/src", "mode": "ro"}}
    volumes.update({d: {"bind": d, "mode": "ro"} for d in APT_DIRS if os.path.isdir(d)})
    # create + start (not run): a container that fails to start is still removed below.
    box = client.containers.create(
        # The build variant: a machine whose apt reaches the package index (the clean image has no sources).
        docker_env.python_build_image,
        ["sleep", "infinity"],
        name=unique_name("install"),
        # It runs a Docker engine of its own: every capability `--privileged` would give but the one this
        # sandbox itself lacks (CAP_SYS_RESOURCE: asking for it makes runc refuse to start the container).
        cap_add=["ALL"],
        cap_drop=["SYS_RESOURCE"],
        security_opt=["seccomp=unconfined", "apparmor=unconfined"],
        volumes=volumes,
        tmpfs={"/var/lib/docker": "", "/tmp": ""},
    )
    try:
        box.start()
        code, out = _sh(
            box,
            # A real machine's cgroups are writable; a container's are mounted read-only.
            "set -e; for d in /sys/fs/cgroup /sys/fs/cgroup/* /proc/sys; do "
            "mount -o remount,rw \"$d\" 2>/dev/null || true; done; "
            "export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; "
            "apt-get install -y -qq --no-install-recommends sudo >/dev/null; "
            "useradd --create-home --shell /bin/bash dev; "
            "echo 'dev ALL=(ALL) NOPASSWD:ALL' >/etc/sudoers.d/dev; chmod 440 /etc/sudoers.d/dev",
        )
        assert code == 0, f"preparing the new machine failed:\n{out}"
        yield box
    finally:
        box.remove(force=True, v=True)
        client.close()


def test_a_sudoer_on_a_machine_without_docker_gets_an_engine_from_docker_up(machine: Container) -> None:
    """From nothing, as a sudoer: installed with apt, started through sudo, the user added to `docker`."""
    code, out = _sh(machine, "PATH=$PATH:/usr/sbin command -v dockerd || command -v docker-compose || command -v pgrep")
    assert code != 0, f"the new machine already has Docker (or procps):\n{out}"

    code, out = _sh(machine, "cd /src && scripts/docker-up.sh", user="dev")
    assert code == 3, f"expected exit 3 (added to the docker group, re-run under it), got {code}:\n{out}"
    assert "installing: docker-compose docker.io (apt)" in out or "installing: docker.io" in out, out
    assert "sg docker -c" in out, out
    # `$!` after `sudo dockerd` is sudo's pid; the script must not take the daemon for dead and start another.
    code, ps = _sh(machine, "grep -lsx dockerd /proc/[0-9]*/comm | wc -l")
    assert ps.strip() == "1", f"expected one dockerd, found {ps.strip()}:\n{out}"

    code, out = _sh(machine, "cd /src && sg docker -c scripts/docker-up.sh", user="dev")
    assert code == 0, out
    assert "docker daemon already running" in out, out
    assert "installing" not in out, f"the second run installed packages again:\n{out}"
    assert "docker server:" in out and "compose:" in out, out

    code, out = _sh(machine, "sg docker -c 'docker info --format {{.ServerVersion}}'", user="dev")
    assert code == 0 and out.strip(), out


def test_root_reuses_the_running_engine_and_installs_nothing(machine: Container) -> None:
    """Idempotent as root too: the engine the sudoer started answers; no apt, no second daemon."""
    code, out = _sh(machine, "cd /src && scripts/docker-up.sh")
    assert code == 0, out
    assert "installing" not in out and "starting dockerd" not in out, out
    code, ps = _sh(machine, "grep -lsx dockerd /proc/[0-9]*/comm | wc -l")
    assert ps.strip() == "1", ps


def test_a_sudoer_runs_the_test_command_and_a_broken_venv_is_rebuilt(machine: Container) -> None:
    """scripts/test as a sudoer: redis-server comes from apt through sudo, and a `.venv` left without pip by a
    failed first run is rebuilt instead of trusted (the quick suite of one module, to keep this short)."""
    code, out = _sh(
        machine,
        "set -e; rm -rf ~/src; mkdir ~/src; cd /src; "
        "tar --exclude=./.venv --exclude=./.autoscaler -cf - . | tar -C ~/src -xf -; "
        "cd ~/src; python3 -m venv --without-pip .venv",
        user="dev",
    )
    assert code == 0, out
    code, out = _sh(machine, "cd ~/src && scripts/test --quick -- tests/test_startup_grace.py -p no:cacheprovider",
                    user="dev")
    assert code == 0, out[-4000:]
    assert "2 passed" in out, out[-4000:]
    code, out = _sh(machine, "command -v redis-server")
    assert code == 0, "scripts/test did not install redis-server"
