"""Evaluation of draft models by real speculative decoding: the decoding loop, metrics and report.

The ``eval`` stage itself lives in :mod:`deepspec.eval.stage`.
"""

from deepspec.eval.metrics import AcceptanceSums, acceptance_sums
from deepspec.eval.report import build_report, render_markdown
from deepspec.eval.speculative import GenerationResult, RoundRecord, rejection_sample, speculative_generate

__all__ = [
    "AcceptanceSums",
    "GenerationResult",
    "RoundRecord",
    "acceptance_sums",
    "build_report",
    "rejection_sample",
    "render_markdown",
    "speculative_generate",
]
