"""Errors as the APIs speak them: OpenAI's error object, or Ollama's {"error": message}.

Handlers raise `APIError`; the library's own errors (one line that names the fix) become 400s,
an unknown model a 404. HTTP handlers never build error bodies themselves.
"""

from __future__ import annotations

from gemma_mlx.errors import BadImage, ContextOverflow, GemmaError, ModelNotFound

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 409: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
               503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def openai(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def ollama(self) -> dict:
        return {"error": self.message}


def from_library(error: GemmaError) -> APIError:
    """A user error from the library, as the status a client expects."""
    if isinstance(error, ModelNotFound):
        return APIError(404, str(error), param="model", code="model_not_found")
    if isinstance(error, ContextOverflow):
        return APIError(400, str(error), param="messages", code="context_length_exceeded")
    if isinstance(error, BadImage):
        return APIError(400, str(error), param="messages", code="invalid_image")
    return APIError(400, str(error))


def unsupported(fields: list[str]) -> APIError:
    """A 400 naming the options we do not implement (never silently ignored)."""
    names = sorted(fields)
    return APIError(400, f"unsupported option(s): {', '.join(names)}; gemma-mlx does not "
                    "implement them: leave them out", param=names[0],
                    code="unsupported_parameter")
