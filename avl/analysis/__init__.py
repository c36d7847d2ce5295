"""Attention analysis (the paper's Fig. 1, 3, 4, 5): modal shares, concentration and PPCI of the
attention a model runs in one greedy generation on the full cache (`analyze`), averaged over an
eval task's samples (`analyze_samples`), and their figures (`write_figures`)."""

from avl.analysis.analyze import AttentionRecorder, analyze, observing
from avl.analysis.report import MODALITIES, AttentionReport

__all__ = ["MODALITIES", "AttentionRecorder", "AttentionReport", "analyze", "observing"]
