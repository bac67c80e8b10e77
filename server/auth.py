"""Request guards: API key and admin key, and the start-up check that a server reachable
beyond loopback does not take writes from anyone (see docs/security.md)."""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Depends, Request

from docqa.settings import ServerSettings
from server.deps import app_state
from server.errors import APIError
from server.state import AppState


class InsecureSettings(ValueError):
    """The settings would expose writes to anyone who can reach the port."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name (or "" / "0.0.0.0" style wildcard): assume reachable


def check_exposure(s: ServerSettings) -> None:
    """Refuse settings that listen beyond loopback with no api_key (document writes would be
    open to anyone on the network), unless ``allow_insecure_writes`` says so."""
    if not is_loopback(s.host) and s.api_key is None and not s.allow_insecure_writes:
        raise InsecureSettings(
            f"server.host is {s.host!r} (reachable beyond this machine) and no server.api_key "
            "is set: anyone who can reach the port could add or delete documents. Set "
            "server.api_key (DOCQA_SERVER__API_KEY), or server.allow_insecure_writes: true to "
            "start anyway. See docs/security.md."
        )


def _check_key(request: Request, expected: str | None) -> None:
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise APIError(
            401,
            "You didn't provide an API key. Send 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
        )
    # Headers arrive as latin-1 text: compare the raw bytes (compare_digest refuses non-ASCII
    # str), so a non-ASCII token is a 401 and a non-ASCII key sent as UTF-8 works.
    sent = token.strip().encode("latin-1", "replace")
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent, expected.encode("utf-8")):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


async def require_api_key(request: Request, state: AppState = Depends(app_state)) -> None:
    key = state.settings.server.api_key
    _check_key(request, key.get_secret_value() if key else None)


async def require_admin_key(request: Request, state: AppState = Depends(app_state)) -> None:
    """Admin endpoints need ``server.admin_key`` (never the api_key); unset = they are off."""
    key = state.settings.server.admin_key
    if key is None:
        raise APIError(
            403,
            "admin endpoints are off: set server.admin_key to use them",
            code="admin_disabled",
        )
    _check_key(request, key.get_secret_value())
