"""Why a request for a model cannot be served, and the one table that maps each reason to HTTP.

The scheduler and the coordinator speak in reasons (``Refused``); only the HTTP edge
(the proxy, the control app) turns one into a status code and an OpenAI envelope,
through ``http_error``. A new reason is added here, with its status, and nowhere else.
"""

from __future__ import annotations

import enum

from core.common.errors import ServiceError


class Reason(enum.Enum):
    """A domain reason; its value is the OpenAI ``code`` the client sees."""

    QUEUE_FULL = "queue_full"  # too many requests already waiting for the model
    WAIT_TIMEOUT = "wait_timeout"  # the model did not become servable within max_wait
    START_FAILED = "model_start_failed"  # the start this request waited for failed
    COOLING_DOWN = "model_failed"  # failed repeatedly; refused until failed_until
    NO_FIT = "insufficient_gpu_memory"  # can never fit the GPU budget (pinned models, too large)
    NOT_PARKABLE = "cannot_park"  # an operator's park of a model that cannot park, or is not idle and ready
    REMOVED = "model_not_found"  # a reload removed the model this request was waiting for


# The one table: a request's reasons are "try again later" (503; Retry-After says when); an
# operator's action that does not apply to the model's state is a conflict (409).
_STATUS: dict[Reason, int] = {
    Reason.QUEUE_FULL: 503,
    Reason.WAIT_TIMEOUT: 503,
    Reason.START_FAILED: 503,
    Reason.COOLING_DOWN: 503,
    Reason.NO_FIT: 503,
    Reason.NOT_PARKABLE: 409,
    Reason.REMOVED: 404,
}


class Refused(Exception):
    """A request the orchestrator will not serve now, with why and (if known) when to retry."""

    def __init__(self, reason: Reason, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


def http_status(reason: Reason) -> int:
    return _STATUS[reason]


def http_error(refused: Refused) -> ServiceError:
    """The refusal as the client sees it: status from the table, code from the reason."""
    return ServiceError(http_status(refused.reason), refused.message, refused.reason.value,
                        retry_after=refused.retry_after)
