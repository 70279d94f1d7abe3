"""Online iterative RLHF: label store, pair selection, labelling page, AI judge, one round.

* :mod:`mmllm.rlhf.labels`: :class:`LabelStore`, comparisons and labels in SQLite (WAL,
  fsync per answer), export of the merged comparisons as chosen/rejected JSONL.
* :mod:`mmllm.rlhf.select`: :func:`select_pairs`, the comparisons a reward model is least sure of.
* :mod:`mmllm.rlhf.label_server`: the labelling web page (aiohttp, keyboard shortcuts).
* :mod:`mmllm.rlhf.judge`: :class:`PairwiseJudge`, an AI labeller through a teacher.
* :mod:`mmllm.rlhf.round`: ``mmllm rlhf-round``, one online round (sample, select, label,
  retrain the reward model, PPO), resumable step by step.
"""

from mmllm.rlhf.labels import LABELS, Comparison, LabelStore, comparison_id
from mmllm.rlhf.select import Candidate, select_pairs

__all__ = ["LABELS", "Candidate", "Comparison", "LabelStore", "comparison_id", "select_pairs"]
