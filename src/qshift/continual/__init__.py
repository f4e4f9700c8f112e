"""Continual multi-domain retrieval (DAR): per-domain adapters (:mod:`.adapters`),
prototype routing (:mod:`.router`), merging (:mod:`.merge`), the learners and baselines
(:mod:`.methods`) and the protocol (:mod:`.protocol`, ``qshift continual run``)."""
