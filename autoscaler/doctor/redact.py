"""Everything the doctor prints passes through here: secrets replaced by ***, bytes made printable, length bounded.

Environment values and URLs come from containers the doctor does not control: they may hold passwords,
tokens, non-UTF-8 bytes, control characters or megabytes of text. Nothing of that reaches a terminal or a
JSON report as it is.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["REDACTED", "is_secret_name", "printable", "redact_text", "redact_url", "safe_error", "shown_value"]

REDACTED = "***"
MAX_SHOWN = 160
# Names whose value is a secret whatever it looks like: *_PASSWORD, *_SECRET*, *_KEY, *TOKEN*, credentials.
_SECRET_NAME = re.compile(r"PASSW(OR)?D|SECRET|(^|_)KEY$|_KEY_|TOKEN|CREDENTIAL|(^|_)AUTH($|_)|PASSPHRASE|PRIVATE",
                          re.IGNORECASE)
_SECRET_QUERY = re.compile(r"pass|secret|token|key|auth", re.IGNORECASE)
# user:password@ anywhere in free text (an URL inside a longer value, a malformed URL).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<pw>[^@\s]*)@")
# key=value secrets in free text: libpq conninfo strings ("host=db password=x"), error messages quoting them.
_KEYWORD = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd|requirepass|token|secret)\s*[=:]\s*)(?P<value>'[^']*'|[^\s&;,]+)",
    re.IGNORECASE)


def printable(value: object, limit: int = MAX_SHOWN) -> str:
    """`value` as one printable line: bytes decoded with escapes, control characters escaped, cut at `limit`."""
    text = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes | bytearray) else str(value)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit * 4])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def redact_url(url: str) -> str:
    """`url` with its password and any secret-looking query value replaced; a URL that does not parse is
    redacted as free text (never raises)."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            netloc = f"{user}:{REDACTED}@{hostport}" if colon else f"{user}@{hostport}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, REDACTED if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*")
        return redact_text(urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment)))
    except ValueError:
        return redact_text(url)


def redact_text(text: str) -> str:
    """Free text (an error message, a conninfo string) with URL passwords and `password=...` values hidden."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    return _KEYWORD.sub(lambda m: f"{m['key']}{REDACTED}", text)


def safe_error(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as the doctor may print it: secrets hidden, one bounded printable line."""
    return printable(redact_text(str(exc)), limit)


def shown_value(name: str, value: str) -> str:
    """An environment value as the doctor may print it: secrets by name hidden, URLs redacted, bounded."""
    if is_secret_name(name):
        return REDACTED
    return printable(redact_url(value) if "://" in value else redact_text(value))
