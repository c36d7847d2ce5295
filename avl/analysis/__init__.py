"""Attention analysis (the paper's Fig. 1, 3, 4, 5): modal shares, concentration and PPCI of the
attention a model runs in one greedy generation on the full cache (`analyze`), their figures
(`write_figures`), and the mean over an eval task's samples (`avl.analysis.sweep.analyze_task`,
`avl analyze --sweep-data`)."""

from avl.analysis.analyze import AttentionRecorder, analyze, observing
from avl.analysis.figures import write_figures
from avl.analysis.report import MODALITIES, AttentionReport

__all__ = ["MODALITIES", "AttentionRecorder", "AttentionReport", "analyze", "observing", "write_figures"]
