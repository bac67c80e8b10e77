"""Pure ASGI middleware: the access log (one line per request with latency and token counts,
streaming-safe; the request counters of /metrics, by route template, never by raw path; a
``Server-Timing: app;dur=<ms>`` header on every response) and the
body guard (origin, content type, size, lone surrogates)."""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from urllib.parse import urlsplit

from server import metrics
from server.uploads import is_multipart

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
                # W3C Server-Timing: the server's own time up to the response's head (for a
                # whole JSON answer, the answer; for a stream, its first byte), so a client
                # can tell the server's latency from the network's and its own
                dur = (time.perf_counter() - t0) * 1000
                headers = list(message.get("headers") or [])
                headers.append((b"server-timing", f"app;dur={dur:.1f}".encode()))
                message = {**message, "headers": headers}
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


_UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
_ESCAPE = re.compile(rb"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)


def lone_surrogate(body: bytes) -> bool:
    """Does this JSON text hold a \\uD800-\\uDFFF escape that is not half of a valid pair? (A
    lone surrogate parses into a Python string that cannot be encoded, tokenized or stored.)"""
    if b"\\u" not in body:
        return False
    pending_high = -1  # end offset of an unpaired high surrogate escape
    for m in _ESCAPE.finditer(body):
        cp = int(m.group(1), 16) if m.group(1) else -1
        if pending_high >= 0:
            if m.start() == pending_high and 0xDC00 <= cp <= 0xDFFF:
                pending_high = -1
                continue
            return True
        if 0xD800 <= cp <= 0xDBFF:
            pending_high = m.end()
        elif 0xDC00 <= cp <= 0xDFFF:
            return True
    return pending_high >= 0


def _is_json(content_type: str) -> bool:
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (
        mime.startswith("application/") and mime.endswith("+json")
    )


class BodyGuard:
    """Pure ASGI, before any route runs, for requests that write (POST, PUT, PATCH, DELETE):

    - an ``Origin`` header not in ``server.cors_origins`` -> 403 (a browser page of another
      site; CORS alone does not stop a "simple" POST from being sent and acted on);
    - a body in anything but JSON -> 415 (multipart only where ``multipart_paths`` allow it);
    - a body over ``max_body_bytes`` (a multipart upload: ``multipart_max_bytes``) -> 413,
      from Content-Length or while it streams in (the body is never read past the limit);
    - a JSON body with a lone surrogate escape ("a\\ud800") -> 400.

    The body (at most ``max_body_bytes``) is then replayed to the app."""

    def __init__(
        self,
        app,
        *,
        max_body_bytes: int,
        origins: list[str],
        multipart_paths=(),
        multipart_max_bytes: int = 0,
    ):
        self.app = app
        self.max = max_body_bytes
        # a file upload may be larger than a JSON body (server.max_upload_bytes + form overhead)
        self.multipart_max = max(max_body_bytes, multipart_max_bytes)
        self.origins = {o.rstrip("/") for o in origins}
        self.multipart = tuple(multipart_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in _UNSAFE:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        if origin is not None and not self._origin_ok(origin, headers.get("host", "")):
            return await self._refuse(
                scope,
                receive,
                send,
                403,
                f"requests from origin {origin!r} are not allowed (server.cors_origins)",
                "origin_not_allowed",
            )
        length = headers.get("content-length")
        ctype = headers.get("content-type", "")
        has_body = (length not in (None, "0")) or "transfer-encoding" in headers
        if has_body and not _is_json(ctype):
            if not (is_multipart(ctype) and scope["path"] in self.multipart):
                allowed = "application/json" + (
                    " or multipart/form-data" if scope["path"] in self.multipart else ""
                )
                return await self._refuse(
                    scope,
                    receive,
                    send,
                    415,
                    f"Content-Type must be {allowed}, not {ctype or '(none)'!r}",
                    "unsupported_media_type",
                )
        limit = self.max
        if is_multipart(ctype) and scope["path"] in self.multipart:
            limit = self.multipart_max
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._too_large(scope, receive, send, limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self._too_large(scope, receive, send, limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if _is_json(ctype) and lone_surrogate(body):
            return await self._refuse(
                scope,
                receive,
                send,
                400,
                "the JSON body holds a lone UTF-16 surrogate escape (e.g. \\ud800): not text",
                "invalid_unicode",
            )
        replayed = False

        async def _receive():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, _receive, send)

    def _origin_ok(self, origin: str, host: str) -> bool:
        """In the allow-list, or the server's own page (Swagger UI at /docs) reached by an IP
        address or localhost: a name other than those could be DNS rebinding."""
        if "*" in self.origins or origin.rstrip("/") in self.origins:
            return True
        parts = urlsplit(origin)
        if parts.netloc != host or not parts.hostname:
            return False
        if parts.hostname == "localhost":
            return True
        try:
            ipaddress.ip_address(parts.hostname)
        except ValueError:
            return False
        return True

    async def _too_large(self, scope, receive, send, limit):
        setting = "server.limits.max_body_bytes" if limit == self.max else "server.max_upload_bytes"
        await self._refuse(
            scope,
            receive,
            send,
            413,
            f"request body is larger than {limit} bytes ({setting})",
            "request_too_large",
            close=True,  # the rest of the body is never read
        )

    @staticmethod
    async def _refuse(scope, receive, send, status, message, code, close=False):
        from server.errors import APIError

        headers = {"Connection": "close"} if close else None
        await APIError(status, message, code=code, headers=headers).response()(scope, receive, send)
