"""The query pipeline: ``refine → encode → adapt → transform → rank``.

Every entry point runs it — :meth:`Pipeline.search` in Python, ``qshift search``, the
benchmark runner, the demo and the service. See :mod:`.config` for the declarative
stage lists, :mod:`.stage` for the stage protocol and registry, :mod:`.batch` for what
flows between stages.
"""

from qshift.pipeline.batch import QueryBatch, QueryTransform
from qshift.pipeline.config import StageSpec, parse_pipeline
from qshift.pipeline.context import PipelineContext
from qshift.pipeline.core import Pipeline, SearchResult
from qshift.pipeline.stage import KINDS, Stage, create_stage, list_stages, register_stage
from qshift.pipeline import stages as _builtin  # noqa: F401  (registers encode:frozen, rank:index)

__all__ = ["KINDS", "Pipeline", "PipelineContext", "QueryBatch", "QueryTransform", "SearchResult", "Stage",
           "StageSpec", "create_stage", "list_stages", "parse_pipeline", "register_stage"]
