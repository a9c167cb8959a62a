"""``ApiError``: an error response in OpenAI's ``{"error": {"message", "type", "param", "code"}}``
shape, raised by every route (``serving.py``'s OpenAI routes and ``web.py``'s run routes), and
:func:`add_error_handlers`, the exception handlers that turn it and every other error (a core
:class:`~barkgpt.common.BarkError`, FastAPI's validation errors, 404/405, a crash) into that
shape, as llama-cpp-python's ``server/errors.py`` does; a core error's text loses its absolute
paths on the way (:func:`scrub_paths`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from barkgpt.common import BarkError
from barkgpt.server import protocol as P

log = logging.getLogger("barkgpt.server")


class ApiError(Exception):
    """An error response in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        status: the HTTP status (400, 401, 404, 413, 429, 503...).
        message: one line naming the problem and the fix (no paths or traces); a lone surrogate
            echoed from the request shows as ``\\ud800``, so the body always encodes as UTF-8.
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``...).
        param: the request field at fault, or None.
        code: a machine-readable code (``model_loading``...), or None.
        headers: extra response headers (``Retry-After`` on 429), or None.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        message, param = printable(message), None if param is None else printable(param)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def info(self) -> P.ErrorInfo:
        """The ``error`` object of the body (also what a stream sends as its late ``error`` event)."""
        return P.ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        """The error as a JSON response with its status and headers."""
        return JSONResponse(P.ErrorResponse(error=self.info()).model_dump(), status_code=self.status, headers=self.headers)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/[^\s'\"`<>|]+")


def printable(text: str) -> str:
    """``text`` with lone UTF-16 surrogates (which no UTF-8 text holds; JSON's ``"\\ud800"``
    escape makes one) written as ``\\ud800`` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def scrub_paths(text: str, roots: dict[Path, str] | None = None) -> str:
    """``text`` without absolute server paths, for an error body.

    A path under one of ``roots`` (resolved folder -> label; the deepest that holds it) becomes
    ``label/rest``; any other absolute path becomes ``.../`` and its last component. So
    ``/home/u/runs/x/best/model.safetensors is corrupt`` reads ``runs/x/best/model.safetensors
    is corrupt`` with ``roots={Path("/home/u/runs"): "runs"}``.
    """

    def short(match: re.Match) -> str:
        found = match.group(0)
        path = found.rstrip(".,;:)]}")
        tail = found[len(path) :]
        for root, label in sorted((roots or {}).items(), key=lambda kv: -len(str(kv[0]))):  # the deepest root first
            root_text = str(root).rstrip("/")
            if path == root_text or path.startswith(root_text + "/"):
                return label + path[len(root_text) :] + tail
        return ".../" + Path(path).name + tail

    return _ABSOLUTE_PATH.sub(short, text)


def shutdown_error() -> ApiError:
    """What a request cut short by the shutdown timeout gets: a 503 (``code: shutting_down``)."""
    return ApiError(
        503, "the server shut down before this request finished; retry it", "service_unavailable_error", code="shutting_down"
    )


def validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's validation error as a 400 naming its first bad field (``param``: the dotted path
    below ``body``), or "the body is not valid JSON"."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        msg, param = "the body is not valid JSON", None
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param)


def http_error(method: str, path: str, exc: StarletteHTTPException) -> ApiError:
    """Starlette's HTTP error (no such route, method not allowed, ...) for ``method path``."""
    if exc.status_code == 404:
        return ApiError(404, f"no route {method} {path}", "not_found_error")
    if exc.status_code == 405:
        return ApiError(405, f"{method} is not allowed on {path}")
    return ApiError(exc.status_code, str(exc.detail))


def add_error_handlers(app: FastAPI, path_labels: Callable[[], dict[Path, str]]) -> None:
    """Make every error of ``app`` leave in OpenAI's shape: an :class:`ApiError` as is; a
    :class:`~barkgpt.common.BarkError` (bad input the core refused) as a 400 with its paths
    scrubbed (:func:`scrub_paths` with ``path_labels()``); a lone surrogate as a 400; a request
    cut short by shutdown as :func:`shutdown_error`; a validation error as
    :func:`validation_error`; Starlette's as :func:`http_error`; anything else a logged 500
    without details.

    Args:
        app: the app of :func:`barkgpt.server.app.create_app`.
        path_labels: gives the folders whose paths an error may show, resolved folder -> label.
    """
    from barkgpt.server.scheduler import ShuttingDown  # the scheduler imports torch: not at import

    async def bark_error(request, exc: BarkError):
        return ApiError(400, scrub_paths(str(exc), path_labels())).response()

    handlers = {
        ApiError: _api_error,
        BarkError: bark_error,
        UnicodeError: _unicode_error,
        ShuttingDown: _shutting_down,
        RequestValidationError: _validation_error,
        StarletteHTTPException: _http_error,
        Exception: _internal_error,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)


# The handlers of add_error_handlers (Starlette awaits them on the event loop: async, not run in a thread).


async def _api_error(request, exc: ApiError):
    return exc.response()


async def _unicode_error(request, exc: UnicodeError):  # a lone surrogate that got past the schemas
    return ApiError(
        400, "the request holds text that is not valid Unicode (a lone surrogate such as \\ud800?); send valid UTF-8"
    ).response()


async def _shutting_down(request, exc):
    return shutdown_error().response()


async def _validation_error(request, exc: RequestValidationError):
    return validation_error(exc).response()


async def _http_error(request, exc: StarletteHTTPException):
    return http_error(request.method, request.url.path, exc).response()


async def _internal_error(request, exc: Exception):
    log.exception("unhandled error")
    return ApiError(500, "internal server error", "server_error").response()
