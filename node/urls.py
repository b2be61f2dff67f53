"""Credentials never reach a terminal or a log: one helper masks them in database and broker URLs.

Used wherever the node shows a URL (the demo, ``locus db``, query commands, start-up
errors) and on free text that may quote one (a driver's error message).  The user name,
host, port and path stay visible, so a person can still tell which server is meant.
"""

from __future__ import annotations

import re

MASK = "***"

# ...?password=...&  (libpq and kombu accept credentials as query parameters too)
_QUERY_SECRET = re.compile(r"(?P<key>[?&](?:password|passwd|pwd|sslpassword|secret|token|access_key|secret_key)=)"
                           r"(?P<value>[^&#\s]*)", re.IGNORECASE)


def mask_url(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``.

    Works on one URL or on a message that quotes URLs; text without credentials comes back
    unchanged (``sqlite:////data/locus.db`` stays as it is).
    """
    text = _mask_userinfo(text)
    return _QUERY_SECRET.sub(lambda m: m["key"] + (MASK if m["value"] else ""), text)


def _mask_userinfo(text: str) -> str:
    out: list[str] = []
    pos = 0
    for m in re.finditer(r"[A-Za-z][A-Za-z0-9+.\-]*://", text):
        if m.start() < pos:
            continue
        start = end = m.end()
        while end < len(text) and not text[end].isspace() and text[end] not in "'\"<>":
            end += 1
        segment = text[start:end]
        at = segment.rfind("@")  # the host follows the last "@": a password may hold "@", "/" or ":"
        user, colon, _password = segment[:at].partition(":") if at >= 0 else ("", "", "")
        out.append(text[pos:start])
        if colon and "/" not in user:
            out.append(f"{user}:{MASK}@{segment[at + 1:]}")
        else:
            out.append(segment)
        pos = end
    out.append(text[pos:])
    return "".join(out)
