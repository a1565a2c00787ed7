"""Evaluation harness: ``omnivox eval --model DIR --suite NAME``.

- :mod:`~omnivox.evaluation.metrics`: WER/CER, answer normalisers, format checks, intervals, confusion.
- :mod:`~omnivox.evaluation.tasks`: the one table task -> suite, metric, scorer; the suite registry.
- :mod:`~omnivox.evaluation.data`: manifest lines and speech fixtures -> items.
- :mod:`~omnivox.evaluation.tool_calls`: the task-calls suite's step scorer (right tool, arguments, schema).
- :mod:`~omnivox.evaluation.runner`: select items, generate (batched, multi-turn, tool-call steps), score, aggregate.
- :mod:`~omnivox.evaluation.report`: results.json, results.md, plots, the terminal table.
- :mod:`~omnivox.evaluation.cli`: ``add_eval_arguments`` and ``run_eval`` for the CLI.
"""

from omnivox.evaluation.runner import EvalResults, ItemRecord, evaluate, run_selection, select
from omnivox.evaluation.tasks import FORMATS, SUITES, TASKS, FormatSpec, TaskSpec, canonical_task

__all__ = ["FORMATS", "SUITES", "TASKS", "EvalResults", "FormatSpec", "ItemRecord", "TaskSpec", "canonical_task", "evaluate", "run_selection", "select"]
