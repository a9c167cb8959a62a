"""``ApiError``: an error response in OpenAI's ``{"error": {"message", "type", "param", "code"}}``
shape, raised by every route (``app.py``'s OpenAI routes and ``web.py``'s run routes) and turned
into a response by one exception handler, as llama-cpp-python's ``server/errors.py`` does.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.responses import JSONResponse

from barkgpt.server import protocol as P


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

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
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
        tail = found[len(path):]
        for root, label in sorted((roots or {}).items(), key=lambda kv: -len(str(kv[0]))):  # the deepest root first
            root_text = str(root).rstrip("/")
            if path == root_text or path.startswith(root_text + "/"):
                return label + path[len(root_text):] + tail
        return ".../" + Path(path).name + tail

    return _ABSOLUTE_PATH.sub(short, text)
