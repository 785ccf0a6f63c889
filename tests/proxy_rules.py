"""The socket proxy's rules (deploy/socket-proxy/haproxy.cfg) read back as Python, for tests.

HAProxy evaluates them with PCRE2; the patterns use nothing whose meaning differs in Python's `re`
(classes, alternation, `\\s`, one negative look-ahead), so the pure tests can judge thousands of bodies while
the Docker test checks a sample against the real proxy and engine.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

HAPROXY_CFG = Path(__file__).resolve().parents[1] / "deploy" / "socket-proxy" / "haproxy.cfg"
_ACL = re.compile(r"^\s*acl\s+(\S+)\s+(path_reg|req\.body -m reg)\s+(.*)$")
_DENY = re.compile(r'^\s*http-request deny .*?(?:string|lf-string) "([^"]*)" (if|unless) (.*)$')


@dataclass(frozen=True)
class Rules:
    regexes: dict[str, re.Pattern[str]]
    # (message, acl names that must all hold) for the create-body denies, in file order.
    body_denies: tuple[tuple[str, tuple[str, ...]], ...]

    def refusal(self, body: str) -> str | None:
        """Why the proxy refuses this create body, or None when it passes it to the engine."""
        matched = {name for name, rx in self.regexes.items() if name.startswith("b_") and rx.search(body)}
        facts = matched | {"p_create", "has_body"}
        for message, needed in self.body_denies:
            if all(name in facts for name in needed):
                return message
        return None


def load_rules(path: Path = HAPROXY_CFG) -> Rules:
    regexes: dict[str, re.Pattern[str]] = {}
    denies: list[tuple[str, tuple[str, ...]]] = []
    for line in path.read_text().splitlines():
        if m := _ACL.match(line):
            name, _, rest = m.groups()
            words = shlex.split(rest, posix=True)  # HAProxy's single quotes: the pattern, taken literally
            flags = re.IGNORECASE if "-i" in words else 0
            regexes[name] = re.compile(words[-1], flags)
        elif (m := _DENY.match(line)) and m.group(2) == "if":
            needed = tuple(m.group(3).split())
            if any(name.startswith("b_") for name in needed):
                denies.append((m.group(1), needed))
    return Rules(regexes, tuple(denies))
