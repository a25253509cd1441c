"""Training: a task interface, a generic loop (dense training, mask-aware fine-tuning), and
checkpoints. See :mod:`selact.train.task` for the contract a task implements."""

from selact.train.checkpoint import (
    file_sha256,
    load_model,
    load_state,
    read_sidecar,
    save_model,
    save_state,
)
from selact.train.loop import (
    FitResult,
    TrainConfig,
    autocast,
    distributed_context,
    evaluate,
    fit,
    hardware,
    selective_layers,
)
from selact.train.task import (
    TASKS,
    Distill,
    Loader,
    Task,
    TaskOptions,
    create_task,
    list_tasks,
    register_task,
)

__all__ = [
    "TASKS",
    "Distill",
    "FitResult",
    "Loader",
    "Task",
    "TaskOptions",
    "TrainConfig",
    "autocast",
    "create_task",
    "distributed_context",
    "evaluate",
    "file_sha256",
    "fit",
    "hardware",
    "list_tasks",
    "load_model",
    "load_state",
    "read_sidecar",
    "register_task",
    "save_model",
    "save_state",
    "selective_layers",
]
