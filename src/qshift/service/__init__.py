"""The HTTP search service (``qshift serve``): the query pipeline over FastAPI, a page at
``/``, micro-batched online adaptation on one worker thread, limits, and metrics."""

from qshift.service.config import Limits, ServiceConfig

__all__ = ["Limits", "ServiceConfig", "create_app"]


def create_app(cfg: ServiceConfig):  # noqa: ANN201 - a FastAPI app (imported lazily)
    from qshift.service.app import create_app as _create

    return _create(cfg)
