"""Request guards: API key and admin key."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request

from server.deps import app_state
from server.errors import APIError
from server.state import AppState


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
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), expected):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


async def require_api_key(request: Request, state: AppState = Depends(app_state)) -> None:
    key = state.settings.server.api_key
    _check_key(request, key.get_secret_value() if key else None)


async def require_admin_key(request: Request, state: AppState = Depends(app_state)) -> None:
    s = state.settings.server
    key = s.admin_key or s.api_key
    if key is None:
        raise APIError(
            403,
            "admin endpoints need server.admin_key or server.api_key set",
            code="admin_disabled",
        )
    _check_key(request, key.get_secret_value())
