"""The socket proxy's create-body rules (deploy/socket-proxy/haproxy.cfg), judged in Python on many bodies.

A create is what a compromised autoscaler would use to get root: the rules must refuse every body that asks
for privileges, host resources or the host's namespaces however the JSON is spelled (key case, spacing,
duplicates, escapes, non-ASCII look-alikes that Go's decoder folds), and pass the clones the autoscaler
really sends. tests/docker/test_socket_proxy.py checks a sample of the same against HAProxy and the engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.proxy_rules import load_rules

RULES = load_rules()
CLONE_BODY: dict[str, Any] = json.loads((Path(__file__).parent / "fixtures" / "clone-body.json").read_text())

# Each is enough, alone, to leave the container or reach the host's resources.
DANGEROUS: list[tuple[str, Any]] = [
    ("Privileged", True),
    ("Binds", ["/:/host"]),
    ("Binds", ["/var/run/docker.sock:/var/run/docker.sock"]),
    ("Binds", ["pg_data:/data"]),
    ("Mounts", [{"Type": "bind", "Source": "/", "Target": "/host"}]),
    ("Mounts", [{"Type": "volume", "Source": "pg_data", "Target": "/data"}]),
    ("VolumesFrom", ["stack-autoscaler-1"]),
    ("Devices", [{"PathOnHost": "/dev/sda", "PathInContainer": "/dev/sda", "CgroupPermissions": "rwm"}]),
    ("DeviceCgroupRules", ["a *:* rwm"]),
    ("DeviceRequests", [{"Driver": "nvidia", "Count": -1, "Capabilities": [["gpu"]]}]),
    ("CapAdd", ["SYS_ADMIN"]),
    ("CapAdd", ["ALL"]),
    ("Sysctls", {"kernel.core_pattern": "|/x"}),
    ("SecurityOpt", ["seccomp=unconfined"]),
    ("SecurityOpt", ["no-new-privileges:true", "apparmor=unconfined"]),
    ("SecurityOpt", ["label=disable"]),
    ("NetworkMode", "host"),
    ("PidMode", "host"),
    ("PidMode", "container:stack-autoscaler-1"),
    ("IpcMode", "host"),
    ("UTSMode", "host"),
    ("UsernsMode", "host"),
    ("NetworkMode", "container:stack-docker-socket-proxy-1"),
    ("Runtime", "io.containerd.runc.v2-unsafe"),
    ("CgroupParent", "/"),
    ("MaskedPaths", []),
    ("ReadonlyPaths", []),
    ("ReadonlyPaths", ["/x"]),  # any list replaces the daemon's defaults: /proc/sys writable
    ("CapAdd", "ALL"),  # Docker's StrSlice takes a plain string too
    ("CapAdd", "SYS_MODULE"),
    ("Capabilities", ["CAP_SYS_ADMIN"]),
    ("Sysctls", {"net.ipv4.ip_forward": "1"}),
    ("PortBindings", {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "2222"}]}),
    ("PublishAllPorts", True),
    ("Links", ["/stack-db-1:/db"]),
    ("Annotations", {"io.kubernetes.cri.untrusted-workload": "false"}),
    ("Cgroup", "container:stack-autoscaler-1"),
    ("SecurityOpt", ["no-new-privileges"] * 3000 + ["seccomp=unconfined"]),  # past a regex stack limit
    ("SecurityOpt", "seccomp=unconfined"),
]


def recase(key: str, flips: list[bool]) -> str:
    return "".join(c.swapcase() if flip else c for c, flip in zip(key, flips + [False] * len(key), strict=False))


def dumps(body: dict[str, Any], *, indent: int | None, tight: bool) -> str:
    return json.dumps(body, indent=indent, separators=(",", ":") if tight else None)


layouts = st.fixed_dictionaries({"indent": st.sampled_from([None, 0, 1, 4]), "tight": st.booleans()})


@given(layouts)
def test_the_clones_the_autoscaler_sends_pass(layout: dict[str, Any]) -> None:
    assert RULES.refusal(dumps(CLONE_BODY, **layout)) is None


@given(
    field=st.sampled_from(DANGEROUS),
    flips=st.lists(st.booleans(), max_size=20),
    where=st.sampled_from(["host-config", "top", "both"]),
    duplicate_after_benign=st.booleans(),
    layout=layouts,
)
@settings(max_examples=400)
def test_every_dangerous_create_is_refused_however_it_is_spelled(
    field: tuple[str, Any], flips: list[bool], where: str, duplicate_after_benign: bool, layout: dict[str, Any]
) -> None:
    key, value = field
    body = json.loads(json.dumps(CLONE_BODY))
    spelled = recase(key, flips)
    targets = {"host-config": [body["HostConfig"]], "top": [body], "both": [body["HostConfig"], body]}[where]
    for target in targets:
        target.pop(key, None)
        target[spelled] = value
    text = dumps(body, **layout)
    if duplicate_after_benign:
        # Go keeps the last of duplicate keys: put a harmless one first, the dangerous one after.
        text = text.replace(f'"{spelled}"', f'"{spelled}": null, "{spelled}"', 1)
    reason = RULES.refusal(text)
    assert reason is not None, f"passed: {key}={value!r} as {spelled!r} ({where})"
    assert reason.startswith("socket proxy: ")


@given(field=st.sampled_from(DANGEROUS), position=st.integers(min_value=0, max_value=30), how=st.sampled_from(
    ["escape", "escape-upper", "kelvin", "long-s", "nbsp"]))
def test_escapes_and_lookalikes_that_go_would_fold_are_refused(field: tuple[str, Any], position: int, how: str) -> None:
    key, value = field
    i = position % len(key)
    spelled = {
        "escape": key[:i] + f"\\u{ord(key[i]):04x}" + key[i + 1:],
        "escape-upper": key[:i] + f"\\u{ord(key[i]):04X}" + key[i + 1:],
        # Go's decoder folds these into k and s (encoding/json fold.go).
        "kelvin": key.replace("k", "\u212a").replace("K", "\u212a") if "k" in key.lower() else key + "\u00a0",
        "long-s": key.replace("s", "\u017f") if "s" in key else key + "\u00a0",
        "nbsp": key + "\u00a0",
    }[how]
    host_config = {k: v for k, v in CLONE_BODY["HostConfig"].items() if k.lower() != key.lower()}
    body = {**CLONE_BODY, "HostConfig": host_config}
    text = json.dumps(body, ensure_ascii=False)
    text = text.replace('"HostConfig": {', '"HostConfig": {"' + spelled + '": ' + json.dumps(value) + ", ", 1)
    # HAProxy sees bytes: judge the UTF-8 bytes one by one, as PCRE2 does without UTF mode.
    as_bytes = text.encode().decode("latin-1")
    assert RULES.refusal(as_bytes) is not None, f"passed: {spelled!r}"


@given(st.binary(max_size=2000))
def test_any_body_is_judged_without_raising(raw: bytes) -> None:
    reason = RULES.refusal(raw.decode("latin-1"))
    assert reason is None or reason.startswith("socket proxy: ")
