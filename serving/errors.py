"""The serving package's typed errors. Each maps to one HTTP status and vLLM's error `type`;
the app turns them into `{"error": {"message", "type", "param", "code"}}` at the edge."""

from __future__ import annotations

from http import HTTPStatus


class ServingError(Exception):
    """Base class: a message fit for the client, with the HTTP status it deserves."""

    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    err_type: str = "InternalServerError"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequestError(ServingError):
    status = HTTPStatus.BAD_REQUEST
    err_type = "BadRequestError"


class ModelNotFoundError(ServingError):
    status = HTTPStatus.NOT_FOUND
    err_type = "NotFoundError"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.", param="model")


class NotFoundError(ServingError):
    status = HTTPStatus.NOT_FOUND
    err_type = "NotFoundError"


class ServerBusyError(ServingError):
    status = HTTPStatus.TOO_MANY_REQUESTS
    err_type = "TooManyRequestsError"


class ModelLoadError(Exception):
    """The configured model cannot be found or loaded (a start-up error, not an HTTP one)."""
