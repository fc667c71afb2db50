"""The job vocabulary (:mod:`tabby.jobs.vocabulary`) and the one constraint compiler
every backend uses (:mod:`tabby.jobs.constraints`)."""

from tabby.jobs.vocabulary import (
    ConstraintSpec,
    FinishReason,
    GenerationJob,
    JobResult,
    JobStats,
    SamplerSettings,
    StopReason,
    Tokenizer,
    TokenLogprob,
    TokenMasker,
)

__all__ = [
    "ConstraintSpec",
    "FinishReason",
    "GenerationJob",
    "JobResult",
    "JobStats",
    "SamplerSettings",
    "StopReason",
    "TokenLogprob",
    "TokenMasker",
    "Tokenizer",
]
