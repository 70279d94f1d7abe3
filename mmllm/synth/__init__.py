"""Synthetic instruction data through a teacher (:mod:`mmllm.teacher`).

* :class:`~mmllm.synth.self_instruct.SelfInstruct`: self-instruct (Wang et al., 2023) grows a task
  pool from seed tasks (``mmllm/synth/assets/seed_tasks.jsonl``): propose, filter (heuristics,
  ROUGE-L near-duplicates), classify, write instances.
* :class:`~mmllm.synth.evol_instruct.EvolInstruct`: Evol-Instruct (Xu et al., 2023) rewrites
  instructions in depth and breadth over rounds and eliminates failed evolutions.

Both write ``sft.jsonl`` (``{"messages": [...]}`` rows for :class:`~mmllm.data.sft.SFTDataModule`)
and ``stats.json`` (generated, kept, drops by reason). CLI: ``mmllm synth mode=... teacher=...``.
"""

from mmllm.synth.common import SEED_TASKS, SeedTask, SynthResult, load_seed_tasks
from mmllm.synth.evol_instruct import OPERATIONS, EvolInstruct, load_instructions
from mmllm.synth.filters import RougePool, instruction_reason, response_reason
from mmllm.synth.self_instruct import SelfInstruct

__all__ = ["OPERATIONS", "SEED_TASKS", "EvolInstruct", "RougePool", "SeedTask", "SelfInstruct", "SynthResult",
           "instruction_reason", "load_instructions", "load_seed_tasks", "response_reason"]
