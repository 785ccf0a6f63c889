"""Bench: the longest a hostile policy file can hold `validate` or a reload (issue 17, item 6).

Writes one file per hostile shape at the reader's bounds (MAX_POLICY_BYTES, MAX_NODES, MAX_DEPTH) and prints
how long `load_policy` takes to accept or refuse it, with the first problem. A running controller parses a
file once per version (the content hash), so this is the worst pause a single bad edit can cause a tick.

    PYTHONPATH=. .venv/bin/python bench/policy_parse_cost.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from autoscaler.policy.load import PolicyError, load_policy
from autoscaler.policy.untrusted_yaml import MAX_NODES, MAX_POLICY_BYTES

ROOT = Path(__file__).resolve().parent.parent
LIMIT = MAX_POLICY_BYTES


def shapes() -> dict[str, bytes]:
    seed = (ROOT / "policies" / "default.yaml").read_bytes()
    laughs = b"x0: &l0 [a, a, a, a, a, a, a, a, a, a]\n" + b"".join(
        b"x%d: &l%d [%s]\n" % (i, i, b", ".join([b"*l%d" % (i - 1)] * 10)) for i in range(1, 10)
    )
    merges = b"m0: &m0 {k0: 1}\n" + b"".join(
        b"m%d: &m%d {<<: *m%d, k%d: 1}\n" % (i, i, i - 1, i) for i in range(1, 3500)
    )
    return {
        "shipped default.yaml": seed,
        "default.yaml repeated to the byte bound": (seed * (LIMIT // len(seed) + 1))[:LIMIT],
        "flat list at the byte bound": b"x: [" + b"a," * (LIMIT // 2 - 4) + b"a]\n",
        "flat list of MAX_NODES values": b"x: [" + b"a," * (MAX_NODES - 2) + b"a]\n",
        "small mappings at the byte bound": b"".join(b"k%d: {a: 1, b: [x, y]}\n" % i for i in range(LIMIT // 24)),
        "one long scalar line": b"x: " + b"a " * (LIMIT // 2 - 4) + b"\n",
        "one long comment line": b"#" + b"x" * (LIMIT - 10) + b"\n",
        "line breaks only": b"\n" * (LIMIT - 8) + b"x: 1\n",
        "deep flow nesting": b"x: " + b"[" * (LIMIT - 8) + b"\n",
        "billion laughs": laughs,
        "merge chain": merges,
        "byte bound + 1": seed + b"#" * (LIMIT + 1 - len(seed)),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "policy.yaml"
        print(f"{'shape':44} {'bytes':>8} {'seconds':>8}  outcome")
        for name, content in shapes().items():
            path.write_bytes(content)
            started = time.perf_counter()
            try:
                policy = load_policy(path)
                outcome = f"ok ({len(policy.pools)} pools)"
            except PolicyError as exc:
                first = exc.problems[0]
                outcome = f"refused, {len(exc.problems)} problem(s); first: line {first.line}: {first.message[:70]}"
            print(f"{name:44} {len(content):>8} {time.perf_counter() - started:>8.2f}  {outcome}")


if __name__ == "__main__":
    main()
