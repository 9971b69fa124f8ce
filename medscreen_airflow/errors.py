"""The errors an Airflow task of medscreen raises: each says which step failed, why, and what to do."""
from __future__ import annotations


class OrchestrationError(RuntimeError):
    """A pipeline step failed; the message says which, why, and what to do."""


class QCGateFailed(OrchestrationError):
    """Scoring outputs failed the QC gate; the message lists every reason."""


class PublishRefused(OrchestrationError):
    """A screening list failed a publish check; the message lists each one."""
