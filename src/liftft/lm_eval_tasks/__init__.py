"""An lm-eval-harness task pack for the LLM-Adapters benchmarks, scored as ``liftft eval`` scores them.

- :mod:`~liftft.lm_eval_tasks.pack`: writing the YAML tasks and groups that point at a local data dir.
- :mod:`~liftft.lm_eval_tasks.hooks`: the prompt, answer filter and scoring that lm-eval calls while it runs them.
"""

from liftft.lm_eval_tasks.hooks import ExtractAnswer, doc_to_text
from liftft.lm_eval_tasks.pack import DATA_DIR_ENV, lm_eval_name, suite_name, write_task_pack

__all__ = ["DATA_DIR_ENV", "ExtractAnswer", "doc_to_text", "lm_eval_name", "suite_name", "write_task_pack"]
