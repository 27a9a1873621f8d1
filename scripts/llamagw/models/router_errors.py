"""The errors a request gets in router mode, each with the answer it makes.

ModelError carries `status`, `code` and `message` for the gateway's error envelope and
`retry_after` for a Retry-After header: ModelNotFound (404 model_not_found), ModelNotAllowed
(403 model_not_allowed), ModelLoading (503 model_loading, Retry-After RETRY_AFTER_LOADING),
ModelFailed (503 model_failed, Retry-After until the failure back-off ends). Raised by
models/router.py and models/router_loads.py, and re-exported by models/router.py.
"""

from __future__ import annotations

from llamagw.errors import RETRY_AFTER_LOADING  # the one named value (errors.py says why)


class ModelError(Exception):
    """A request cannot use a model; status/code/message form the gateway's error answer."""
    status = 503
    code = "model_error"

    def __init__(self, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class ModelNotFound(ModelError):
    status = 404
    code = "model_not_found"


class ModelNotAllowed(ModelError):
    status = 403
    code = "model_not_allowed"


class ModelLoading(ModelError):
    code = "model_loading"


class ModelFailed(ModelError):
    code = "model_failed"
