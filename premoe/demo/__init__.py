"""The bundled demo: a small char-level Qwen3-MoE model and the synthetic tasks it was trained on.

`MODEL_DIR` is the trained model (a standard Hugging Face folder: ``AutoModelForCausalLM`` and
``AutoTokenizer`` load it offline); `premoe.demo.tasks` holds the task suite. The weights are
reproduced by ``examples/train_demo.py``.
"""

from __future__ import annotations

from pathlib import Path

from premoe.demo.tasks import (
    TASKS,
    Task,
    accuracy,
    build_tokenizer,
    exact_match,
    generate,
    solve,
    task_names,
    write_jsonl,
    write_suite,
)

#: Folder of the bundled demo model.
MODEL_DIR: Path = Path(__file__).resolve().parent / "model"


def model_path() -> Path:
    """Path of the bundled demo model folder."""
    return MODEL_DIR


__all__ = [
    "MODEL_DIR",
    "TASKS",
    "Task",
    "accuracy",
    "build_tokenizer",
    "exact_match",
    "generate",
    "model_path",
    "solve",
    "task_names",
    "write_jsonl",
    "write_suite",
]
