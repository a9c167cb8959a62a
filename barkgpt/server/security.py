"""What every request to ``barkgpt serve`` passes before routing, and the path rule of the run routes.

:class:`Guard` is an ASGI middleware (inside the metrics counter, outside everything else). In order:

1. ``Host`` must name this server: the bound address, ``localhost``, ``127.0.0.1``, ``[::1]`` or an
   ``--allowed-host`` (any port), else 421. This stops DNS rebinding: a page on ``evil.example``
   that re-points its own name to 127.0.0.1 still sends ``Host: evil.example``.
2. The API key, when one is set (constant-time compare), except on the public pages: 401.
3. On ``POST``, ``PUT``, ``PATCH`` and ``DELETE``: an ``Origin`` header must be the server's own
   (its host and port equal ``Host``) or a ``--cors-origin``, else 403; and ``Content-Type`` must
   be ``application/json``, else 415. An HTML form (urlencoded, multipart, text/plain) or a
   cross-site ``fetch`` without a CORS preflight can send no other type, so no other site can
   make a browser change the server's state (OWASP's CSRF cheat sheet, "custom request headers").
4. The body cap: 413 over ``max_body_bytes``, chunked bodies included.

Every response carries ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff`` and
``Referrer-Policy: no-referrer``, and every one but FastAPI's ``/docs`` (Swagger UI, which loads
its script from a CDN) a Content-Security-Policy that lets a page run only the server's own
scripts and styles and talk only to the server.

:func:`inside` and :func:`resolve_data` are the rule for paths a request names: resolved with
every symlink followed, and inside one of the allowed roots, or refused.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from barkgpt.config import ServeConfig
from barkgpt.server.errors import ApiError

DRAIN_MAX_BYTES = 64 << 20  # a refused body up to 64 MiB is read and dropped before the 413
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
WILDCARD_BINDS = {"0.0.0.0", "::", ""}  # every interface: not a name a client sends
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
NO_CSP_PATHS = {"/docs", "/docs/oauth2-redirect", "/redoc"}  # FastAPI's docs pages load scripts from a CDN
HEADERS = [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]


def host_name(value: str) -> str | None:
    """The name in a ``Host`` value (``name``, ``name:port``, ``[v6]`` or ``[v6]:port``), lowercased
    and without brackets or port; None when it is malformed or empty."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        rest = v[end + 1 :]
        if end < 0 or rest and not (rest[0] == ":" and rest[1:].isascii() and rest[1:].isdigit()):
            return None
        return v[1:end] or None
    name, colon, port = v.rpartition(":")
    if not colon:
        return v or None
    if ":" in name or not (port.isascii() and port.isdigit()):
        return None
    return name or None


def allowed_hosts(bind: str, extra: Iterable[str]) -> set[str] | None:
    """The ``Host`` names a server bound to ``bind`` answers: the loopback names, ``bind`` unless it
    is a wildcard (``0.0.0.0``, ``::``), and ``extra`` (``--allowed-host``, each with or without a
    port, which is not compared). None when ``extra`` holds ``*``: any name."""
    names = set(LOOPBACK_NAMES)
    for h in ([] if bind in WILDCARD_BINDS else [bind]) + list(extra):
        if h.strip() == "*":
            return None
        names.add(host_name(h) or h.strip().lower())
    return names


class Guard:
    """ASGI middleware: the Host, API key, Origin, Content-Type and body-size checks, before
    routing (see the module docstring), and the security headers on every response.

    Args:
        app: the ASGI app it wraps.
        settings: the bound ``host``, ``allowed_host``, ``api_key``, ``cors_origin`` and ``max_body_bytes``.
        public: whether a path needs no API key (the pages and static files).
    """

    def __init__(self, app, settings: ServeConfig, public: Callable[[str], bool]):
        self.app, self.public = app, public
        self.hosts = allowed_hosts(settings.host, settings.allowed_host)
        self.api_key, self.max_body_bytes = settings.api_key, settings.max_body_bytes
        self.origins = {o.strip().lower().rstrip("/") for o in settings.cors_origin}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self._with_headers(scope["path"], send)
        hosts = [v.decode("latin-1") for k, v in scope["headers"] if k == b"host"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = self._check(scope, hosts, headers)
        if error is not None:
            length = headers.get("content-length", "")
            await self._drain(receive, int(length) if length.isdigit() else 0)
            return await error.response()(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await self._drain(receive, int(length))
            return await self._too_large().response()(scope, receive, send)
        # Read the body here (at most max_body_bytes), so a chunked body without Content-Length
        # is capped too, then hand it on; later receive() calls (disconnects) pass through.
        messages, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                if message.get("more_body"):
                    await self._drain(receive, size)
                return await self._too_large().response()(scope, receive, send)
            messages.append(message)
            if not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def _check(self, scope, hosts: list[str], headers: dict[str, str]) -> ApiError | None:
        """The first check the request fails, as its error; None when it passes them all."""
        name = host_name(hosts[0]) if len(hosts) == 1 else None
        if name is None or self.hosts is not None and name not in self.hosts:
            return ApiError(
                421,
                "this server does not answer to that Host header; call it as localhost or 127.0.0.1, "
                "or start it with --allowed-host NAME (behind a proxy)",
                code="misdirected_request",
            )
        method = scope["method"]
        if self.api_key is not None and not self.public(scope["path"]) and method != "OPTIONS":
            auth = headers.get("authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode("utf-8", "replace"), self.api_key.encode()):
                return ApiError(
                    401,
                    "missing or wrong API key; send it as 'Authorization: Bearer KEY'",
                    "authentication_error",
                    code="invalid_api_key",
                )
        if method not in STATE_CHANGING:
            return None
        origin = headers.get("origin")
        if origin is not None and not self._origin_ok(origin, hosts[0]):
            return ApiError(
                403,
                "cross-site requests are refused: the Origin header is not this server's; "
                "start it with --cors-origin ORIGIN to allow that site",
                "permission_error",
                code="foreign_origin",
            )
        media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            return ApiError(
                415,
                f"{method} needs 'Content-Type: application/json' (with a JSON body, {{}} when there is nothing to send)",
                code="unsupported_media_type",
            )
        return None

    def _origin_ok(self, origin: str, host: str) -> bool:
        """Whether ``origin`` (``scheme://host[:port]``) is this server (same host and port as
        ``host``, the Host header) or allowed by ``--cors-origin``."""
        o = origin.strip().lower().rstrip("/")
        if "*" in self.origins or o in self.origins:
            return True
        scheme, sep, netloc = o.partition("://")
        return bool(sep) and scheme in ("http", "https") and netloc == host.strip().lower()

    @staticmethod
    def _with_headers(path: str, send):
        """``send`` that adds the security headers to the response's start message."""
        extra = HEADERS if path in NO_CSP_PATHS else [*HEADERS, (b"content-security-policy", CSP.encode())]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return send_with_headers

    @staticmethod
    async def _drain(receive, length: int) -> None:
        """Read and drop a refused body (up to ``DRAIN_MAX_BYTES``) so the error reaches a client
        that sends its whole body before reading, instead of a connection reset."""
        if length > DRAIN_MAX_BYTES or length <= 0:
            return
        read = 0
        while read <= DRAIN_MAX_BYTES:
            message = await receive()
            read += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                return

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is over {self.max_body_bytes} bytes", code="request_too_large")


# ---- paths a request names ---------------------------------------------------------------------


def inside(path: Path, roots: Iterable[Path]) -> Path | None:
    """``path`` resolved with every symlink followed, when it exists and lies in one of ``roots``
    (resolved folders; a root itself counts); else None, for a missing path, a bad name (NUL,
    surrogates, too long) or a symlink loop as for a path outside."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        return None
    return real if any(real.is_relative_to(r) for r in roots) else None


def links_out(folder: Path, roots: list[Path]) -> bool:
    """Whether any symlink under ``folder`` (at any depth) leads out of ``roots`` or nowhere:
    training on a folder reads its files, so one such link would read a file outside."""
    for dirpath, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            entry = Path(dirpath, name)
            if entry.is_symlink() and inside(entry, roots) is None:
                return True
    return False


def resolve_data(text: str, roots: list[Path]) -> Path | None:
    """Where a run started over HTTP may read its ``data``: ``text`` resolved with every symlink
    followed, inside one of ``roots`` (resolved folders), and for a folder with no symlink inside
    that leads out of them. A relative path is tried against the server's working folder, then
    against each root in turn. None when no candidate qualifies (missing or outside alike, so
    the answer tells nothing about files outside the roots)."""
    path = Path(text)
    if path.is_absolute():
        candidates = [path]
    else:
        try:
            candidates = [Path.cwd() / path]
        except OSError:  # the working folder was deleted
            candidates = []
        candidates += [r / path for r in roots]
    for candidate in candidates:
        real = inside(candidate, roots)
        if real is not None and not (real.is_dir() and links_out(real, roots)):
            return real
    return None
