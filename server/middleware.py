"""Pure ASGI access log: one line per request with latency and token counts (streaming-safe),
and the request counters of /metrics (by route template, never by raw path)."""

from __future__ import annotations

import logging
import time

from server import metrics

log = logging.getLogger("docqa.access")


class AccessLog:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 0}
        scope.setdefault("state", {})

        async def _send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            usage = scope["state"].get("usage") or {}
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            metrics.observe_request(
                route,
                status["code"],
                time.perf_counter() - t0,
                scope["state"].get("error_code"),
            )
            log.info(
                "%s %s %s %.1fms prompt_tokens=%s completion_tokens=%s",
                scope.get("method"),
                scope.get("path"),
                status["code"],
                (time.perf_counter() - t0) * 1000,
                usage.get("prompt_tokens", "-"),
                usage.get("completion_tokens", "-"),
            )
