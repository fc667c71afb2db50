"""The job vocabulary (:mod:`tabby.jobs.vocabulary`) and a job's events
(:mod:`tabby.jobs.events`)."""

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
