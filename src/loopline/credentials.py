"""Credentials in URLs: never stored, never printed, taken from the environment.

A URL in ``loopline.yaml`` (a warehouse's ``data.source.url``, ``store.metadata_url``) may
name its secret as an environment variable, ``postgresql://user:${WAREHOUSE_PASSWORD}@host/db``:
the reference is what is stored and shown, and it is expanded only when the URL is opened.
A password written into the URL itself still works, but everything Loopline records or
prints (run configs, step params, dataset versions, lineage, logs, errors) shows it as
``***``, as the metadata store's own messages always have.
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote

from loopline.errors import ConfigError

MASK = "***"

# The userinfo of ``scheme://user:password@host...``, split as urllib splits it: the user
# ends at the first ``:`` and the password at the last ``@`` before the host
# (``u:p@ss@host`` has password ``p@ss``). The password may also hold ``/``
# (``u:p/ss@host``): each further ``@`` is taken into it while no ``/``, ``?`` or ``#``
# comes first, so an ``@`` in the path or query is never reached. Any scheme counts, a
# mistyped one (``postgres ql://``) too.
_USERINFO = re.compile(
    r"^(?P<head>[^:/?#@]+://[^:/]*:)(?P<password>[^@]*(?:@[^@/?#]*(?=@))*)(?P<tail>@)"
)
# Password-like query parameters (``?password=...``, as libpq and some drivers accept).
_QUERY_SECRET = re.compile(r"(?P<key>[?&](?:password|passwd|pwd)=)(?P<value>[^&#]*)", re.I)
_ENV_REF = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)\}")


def _is_reference(value: str) -> bool:
    return _ENV_REF.fullmatch(value) is not None


def mask_url(url: str) -> str:
    """``url`` with every literal secret replaced by ``***``.

    An environment reference (``${NAME}``) is kept: it names a secret, it is not one. The
    rest of the URL is left exactly as written, so masking is stable and idempotent.
    """

    def password(m: re.Match[str]) -> str:
        value = m.group("password")
        hidden = value if not value or _is_reference(value) else MASK
        return f"{m.group('head')}{hidden}{m.group('tail')}"

    def query(m: re.Match[str]) -> str:
        value = m.group("value")
        return m.group("key") + (value if not value or _is_reference(value) else MASK)

    return _QUERY_SECRET.sub(query, _USERINFO.sub(password, url, count=1))


def has_masked_secret(url: str) -> bool:
    """True when ``url`` holds ``***`` where a secret was: it cannot be opened as it is."""
    m = _USERINFO.match(url)
    if m is not None and m.group("password") == MASK:
        return True
    return any(q.group("value") == MASK for q in _QUERY_SECRET.finditer(url))


def expand_url(url: str, field: str) -> str:
    """The URL to connect with: each ``${NAME}`` replaced by that environment variable.

    A reference standing for the whole password is percent-encoded, so a password with
    ``@`` or ``/`` in it needs no escaping in the environment. Raises ConfigError when a
    variable is unset, or when the URL holds a masked secret (``***``) that was never stored.
    """
    if has_masked_secret(url):
        raise ConfigError(
            f"{field} {url} has its password masked (passwords are never stored); name it "
            "as an environment variable instead, e.g. postgresql://user:${PASSWORD_VAR}@host/db"
        )

    def value(name: str) -> str:
        if name not in os.environ:
            raise ConfigError(f"{field} refers to ${{{name}}}, which is not set in the environment")
        return os.environ[name]

    m = _USERINFO.match(url)
    if m is not None and _is_reference(m.group("password")):
        name = _ENV_REF.fullmatch(m.group("password")).group("name")  # type: ignore[union-attr]
        secret = quote(value(name), safe="")
        url = f"{m.group('head')}{secret}{m.group('tail')}{url[m.end() :]}"
    return _ENV_REF.sub(lambda r: value(r.group("name")), url)


def scrub(text: str, *secrets: str | None) -> str:
    """``text`` with each non-empty secret (and its percent-encoded form) replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK).replace(quote(secret, safe=""), MASK)
    return text


def url_secrets(url: str) -> list[str]:
    """The literal secrets ``url`` holds (its password and password-like query values)."""
    from urllib.parse import unquote

    found: list[str] = []
    m = _USERINFO.match(url)
    if m is not None and m.group("password"):
        found += [m.group("password"), unquote(m.group("password"))]
    for q in _QUERY_SECRET.finditer(url):
        if q.group("value"):
            found += [q.group("value"), unquote(q.group("value"))]
    return found
