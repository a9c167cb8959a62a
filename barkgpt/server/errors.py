"""``ApiError``: an error response in OpenAI's ``{"error": {"message", "type", "param", "code"}}``
shape, raised by every route (``app.py``'s OpenAI routes and ``web.py``'s run routes) and turned
into a response by one exception handler, as llama-cpp-python's ``server/errors.py`` does.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from barkgpt.server import protocol as P


class ApiError(Exception):
    """An error response in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        status: the HTTP status (400, 401, 404, 413, 429, 503...).
        message: one line naming the problem and the fix (no paths or traces).
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``...).
        param: the request field at fault, or None.
        code: a machine-readable code (``model_loading``...), or None.
        headers: extra response headers (``Retry-After`` on 429), or None.
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def info(self) -> P.ErrorInfo:
        """The ``error`` object of the body (also what a stream sends as its late ``error`` event)."""
        return P.ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        """The error as a JSON response with its status and headers."""
        return JSONResponse(P.ErrorResponse(error=self.info()).model_dump(), status_code=self.status, headers=self.headers)
