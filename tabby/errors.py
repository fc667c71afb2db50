"""tabby's one error hierarchy.

Every error a user can see is a :class:`TabbyError`. Each class carries the HTTP
status, an error type (``invalid_request_error``, ``rate_limit_error``, ...: the
categories API error bodies name) and a default ``code``. The HTTP layer maps them to a
status in exactly one place (``tabby.http.errors``) and each protocol renders the body in
its own shape; nothing here knows a wire format. Backend exceptions are translated
into this tree at the adapter boundary; nothing classifies an error by its text.

    TabbyError                          500 server_error
    ├── InvalidRequest                  400 invalid_request_error
    │   ├── ContextLengthExceeded       400 code=context_length_exceeded
    │   ├── TemplateError               400 code=template_error
    │   └── ConstraintError             400 code=invalid_constraint
    ├── AuthenticationError             401 authentication_error
    ├── PermissionDenied                403 permission_error
    ├── NotFound                        404 not_found_error
    │   └── ModelNotFound               404 invalid_request_error, code=model_not_found
    ├── MethodNotAllowed                405 invalid_request_error
    ├── RequestTimeout                  408 code=request_timeout
    ├── Conflict                        409 conflict_error
    ├── PayloadTooLarge                 413 invalid_request_error
    ├── Unprocessable                   422 invalid_request_error
    │   └── RequestCancelled            422 code=request_cancelled
    ├── TooManyRequests                 429 rate_limit_error (carries retry_after)
    ├── NotImplementedFeature           501 not_implemented
    ├── ServiceUnavailable              503 service_unavailable (may carry retry_after)
    │   └── NoModelLoaded               503 code=model_not_loaded
    ├── BackendUnavailable              422 code=backend_unavailable
    ├── NotSupported                    422 code=not_supported
    └── GenerationFailed                500 code=generation_failed
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BackendUnavailable",
    "Conflict",
    "ConstraintError",
    "ContextLengthExceeded",
    "GenerationFailed",
    "InvalidRequest",
    "MethodNotAllowed",
    "ModelNotFound",
    "NoModelLoaded",
    "NotFound",
    "NotImplementedFeature",
    "NotSupported",
    "PayloadTooLarge",
    "PermissionDenied",
    "RequestCancelled",
    "RequestTimeout",
    "ServiceUnavailable",
    "TabbyError",
    "TemplateError",
    "TooManyRequests",
    "Unprocessable",
]


class TabbyError(Exception):
    """Base of every user-visible error."""

    status: int = 500
    error_type: str = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code


class InvalidRequest(TabbyError):
    status = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class TemplateError(InvalidRequest):
    default_code = "template_error"


class ConstraintError(InvalidRequest):
    default_code = "invalid_constraint"


class AuthenticationError(TabbyError):
    status = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(TabbyError):
    status = 403
    error_type = "permission_error"
    default_code = "admin_required"


class NotFound(TabbyError):
    status = 404
    error_type = "not_found_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    """A request's ``model`` names nothing this server may serve (OpenAI's shape)."""

    error_type = "invalid_request_error"
    default_code = "model_not_found"


class MethodNotAllowed(TabbyError):
    status = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class RequestTimeout(TabbyError):
    """The client did not send its request body in time."""

    status = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class Conflict(TabbyError):
    status = 409
    error_type = "conflict_error"
    default_code = "conflict"


class PayloadTooLarge(TabbyError):
    status = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class Unprocessable(TabbyError):
    status = 422
    error_type = "invalid_request_error"


class RequestCancelled(Unprocessable):
    default_code = "request_cancelled"


class TooManyRequests(TabbyError):
    status = 429
    error_type = "rate_limit_error"
    default_code = "queue_full"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float = 1.0,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after


class NotImplementedFeature(TabbyError):
    status = 501
    error_type = "not_implemented"
    default_code = "not_implemented"


class ServiceUnavailable(TabbyError):
    status = 503
    error_type = "service_unavailable"
    default_code = "service_unavailable"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after  # seconds; None: no Retry-After header


class NoModelLoaded(ServiceUnavailable):
    default_code = "model_not_loaded"


class BackendUnavailable(TabbyError):
    status = 422
    error_type = "invalid_request_error"
    default_code = "backend_unavailable"


class NotSupported(TabbyError):
    status = 422
    error_type = "invalid_request_error"
    default_code = "not_supported"


class GenerationFailed(TabbyError):
    status = 500
    error_type = "server_error"
    default_code = "generation_failed"
