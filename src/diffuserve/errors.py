"""The exception hierarchy every layer raises; the API maps each to one OpenAI error envelope and status."""

from __future__ import annotations


class DiffuserveError(Exception):
    """Base: an HTTP status, an OpenAI error `type`, an optional `code` and the request field at fault."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def envelope(self) -> dict[str, dict[str, str | None]]:
        """The OpenAI error body: {"error": {message, type, param, code}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(DiffuserveError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class Unauthorized(DiffuserveError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(DiffuserveError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RouteNotFound(DiffuserveError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ImageNotFound(DiffuserveError):
    """An image URL whose id is unknown, malformed, expired or evicted from the image store."""

    status = 404
    type = "invalid_request_error"
    code = "image_not_found"


class JobNotFound(DiffuserveError):
    """A job id that is unknown, expired, or another API key's."""

    status = 404
    type = "invalid_request_error"
    code = "job_not_found"


class JobFinished(DiffuserveError):
    """A cancel for a job that already ended."""

    status = 409
    type = "invalid_request_error"
    code = "job_finished"


class MethodNotAllowed(DiffuserveError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(DiffuserveError):
    """The client did not send its whole request in time; the connection is closed after the answer."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(DiffuserveError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedMediaType(DiffuserveError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class QueueFull(DiffuserveError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(DiffuserveError):
    status = 503
    type = "server_error"
    code = "model_not_ready"


class ShuttingDown(DiffuserveError):
    """The server is draining before it exits: it takes no new generations and fails those left at the end."""

    status = 503
    type = "server_error"
    code = "shutting_down"


class ClientClosed(DiffuserveError):
    """The client hung up (while sending its body or waiting); nothing can be sent back. nginx's 499."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


class DeadlineExceeded(DiffuserveError):
    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


class WorkerCrashed(DiffuserveError):
    status = 500
    type = "server_error"
    code = "worker_crashed"


class GenerationFailed(DiffuserveError):
    status = 500
    type = "server_error"
    code = "generation_failed"
