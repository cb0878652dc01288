"""Multitask prompt tuning (Wang et al. 2023, "Multitask Prompt Tuning Enables Parameter-Efficient Transfer
Learning", arXiv 2303.02861): one prompt shared by every task, modulated per task by a low-rank multiplicative
update, prepended to the input embeddings of each batch row of that task:

    P_t = P * (u_t v_t)          P (n, d) shared; u_t (n, k), v_t (k, d) of task t; * elementwise

``n`` virtual tokens (times 2 for SEQ_2_SEQ_LM), rank ``k = num_ranks``, ``num_tasks`` pairs ``(u_t, v_t)``. Trained:
``P``, ``u`` and ``v``; the model is frozen. Initialisation as Hugging Face PEFT: ``P`` random (``RANDOM``, normal
as ``nn.Embedding``) or from a text's token embeddings (``TEXT``); ``u``, ``v`` normal with std 0.02. Target
training from source-task training (the paper's transfer): ``prompt_tuning_init_state_dict_path`` names a file
written after source training (keys ``prompt_embeddings``, ``prefix_task_cols``, ``prefix_task_rows``);
``AVERAGE_SOURCE_TASKS`` takes ``P`` and the mean of the source tasks' ``u``, ``v`` (the target has one task),
``EXACT_SOURCE_TASK`` those of source task ``prompt_tuning_init_task``, ``ONLY_SOURCE_SHARED`` only ``P``.
(The paper distils the shared prompt from single-task teacher prompts; PEFT, and this module, train it directly.)

File keys as PEFT: ``prompt_embeddings`` (n, d), ``prefix_task_cols`` (num_tasks, n, k), ``prefix_task_rows``
(num_tasks, k, d). Each row's task comes with the call, ``model(..., task_ids=...)`` or ``generate(...,
task_ids=...)``, checked (one id per row, in ``[0, num_tasks)``) before anything runs and held for the call in a
thread-local. Differences from PEFT: with ``num_tasks = 1`` ``task_ids`` may be left out (every row is task 0;
PEFT raises); generation that expands the batch (``num_beams``) repeats each row's task id; a mixed batch
(``adapter_names``) is refused (routing is by task).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...config import ConfigError, check_int
from ...registry import register_method
from ..poly.layer import batch_rows, check_task_ids
from .base import EmbeddingPrompt, PromptLearningConfig
from .inputs import batch_size, embed_encoder_prompts, embed_prompts
from .prompt_tuning import PromptTuningConfig, init_token_ids


class MultitaskPromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    RANDOM = "RANDOM"
    AVERAGE_SOURCE_TASKS = "AVERAGE_SOURCE_TASKS"
    EXACT_SOURCE_TASK = "EXACT_SOURCE_TASK"
    ONLY_SOURCE_SHARED = "ONLY_SOURCE_SHARED"


_FROM_SOURCE = (MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS, MultitaskPromptTuningInit.EXACT_SOURCE_TASK,
                MultitaskPromptTuningInit.ONLY_SOURCE_SHARED)


@dataclasses.dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """Multitask prompt tuning (field names and defaults as in Hugging Face PEFT).

    Args:
        prompt_tuning_init: ``RANDOM`` | ``TEXT`` | ``AVERAGE_SOURCE_TASKS`` | ``EXACT_SOURCE_TASK`` |
            ``ONLY_SOURCE_SHARED`` (the last three read ``prompt_tuning_init_state_dict_path``).
        prompt_tuning_init_state_dict_path: a source-training adapter file (``.safetensors`` or a torch file).
        prompt_tuning_init_task: the source task ``EXACT_SOURCE_TASK`` starts from.
        num_ranks: rank ``k`` of each task's update ``u_t v_t``.
        num_tasks: number of tasks (rows name theirs with ``task_ids``; may be left out when 1).
    """

    PEFT_TYPE: ClassVar[str] = "MULTITASK_PROMPT_TUNING"

    prompt_tuning_init: str | MultitaskPromptTuningInit = MultitaskPromptTuningInit.RANDOM
    prompt_tuning_init_state_dict_path: str | None = None
    prompt_tuning_init_task: int | None = 0
    num_ranks: int | None = 1
    num_tasks: int | None = 1

    def __post_init__(self) -> None:
        PromptLearningConfig.__post_init__(self)
        value = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)).upper()
        try:
            self.prompt_tuning_init = MultitaskPromptTuningInit(value)
        except ValueError:
            raise ConfigError(f"MultitaskPromptTuningConfig.prompt_tuning_init: expected one of "
                              f"{[i.value for i in MultitaskPromptTuningInit]}, got {value!r}") from None
        check_int(self, "num_ranks", 1)
        check_int(self, "num_tasks", 1)
        check_int(self, "prompt_tuning_init_task", 0, optional=True)
        init = self.prompt_tuning_init
        if init == MultitaskPromptTuningInit.TEXT and not self.tokenizer_name_or_path:
            raise ConfigError("MultitaskPromptTuningConfig.tokenizer_name_or_path: required when "
                              "prompt_tuning_init='TEXT'")
        if init == MultitaskPromptTuningInit.TEXT and self.prompt_tuning_init_text is None:
            raise ConfigError("MultitaskPromptTuningConfig.prompt_tuning_init_text: required when "
                              "prompt_tuning_init='TEXT'")
        if init in _FROM_SOURCE and self.prompt_tuning_init_state_dict_path is None:
            raise ConfigError(f"MultitaskPromptTuningConfig.prompt_tuning_init_state_dict_path: required when "
                              f"prompt_tuning_init={init.value!r} (a source-training adapter file)")


def load_source(path: str, device: torch.device) -> dict[str, Tensor]:
    """A source-training adapter file (safetensors, or a torch file loaded with ``weights_only``)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file  # late: only an init from a source file reads one

        return load_file(path, device=str(device))
    return torch.load(path, map_location=device, weights_only=True)


class _Local(threading.local):
    task_ids: Tensor | None = None


_LOCAL = _Local()


@contextlib.contextmanager
def _task_scope(task_ids: Tensor | None) -> Iterator[None]:
    outer = _LOCAL.task_ids
    _LOCAL.task_ids = task_ids
    try:
        yield
    finally:
        _LOCAL.task_ids = outer


@register_method(
    "multitask_prompt_tuning",
    config=MultitaskPromptTuningConfig,
    category="prompt",
    modalities=("text",),
    mergeable=False,
    starts_at_base=False,
    param_formula="n d + T (n k + k d) (n virtual tokens, T tasks, rank k)",
    position="per-task virtual tokens (shared prompt x low-rank task update) prepended to the input embeddings",
    paper="arXiv 2303.02861 (Wang et al. 2023, multitask prompt tuning)",
    examples={"multitask_prompt_tuning": {"num_virtual_tokens": 4, "num_ranks": 2}},
)
class MultitaskPromptAdapter(EmbeddingPrompt):
    method = "multitask_prompt_tuning"
    supports_routing = False  # rows are routed by task_ids, not by adapter_names

    def __init__(self, base: nn.Embedding, config: MultitaskPromptTuningConfig, key: str = "",
                 init: bool = True) -> None:
        super().__init__()
        self.num_virtual_tokens, self.num_tasks = config.num_virtual_tokens, config.num_tasks
        total, d, k, dev = config.total_virtual_tokens, config.token_dim, config.num_ranks, base.weight.device
        self.embedding = nn.Embedding(total, d, device=dev)  # P: (n * S, d)
        if init and not config.inference_mode and config.prompt_tuning_init == MultitaskPromptTuningInit.TEXT:
            ids = torch.tensor(init_token_ids(config, total), device=dev)
            with torch.no_grad():
                self.embedding.weight.copy_(base.weight[ids].float())
        self.prefix_task_cols = nn.Parameter(torch.normal(0, 0.02, size=(config.num_tasks, total, k)).to(dev))
        self.prefix_task_rows = nn.Parameter(torch.normal(0, 0.02, size=(config.num_tasks, k, d)).to(dev))
        if init and config.prompt_tuning_init in _FROM_SOURCE:
            self._from_source(config, dev)

    @torch.no_grad()
    def _from_source(self, config: MultitaskPromptTuningConfig, device: torch.device) -> None:
        """PEFT's initialisation from a source-training file (see the module docstring); shapes are checked."""
        source = load_source(config.prompt_tuning_init_state_dict_path, device)
        tensors = {"embedding.weight": (self.embedding.weight, source["prompt_embeddings"])}
        init = config.prompt_tuning_init
        if init != MultitaskPromptTuningInit.ONLY_SOURCE_SHARED:
            cols, rows = source["prefix_task_cols"], source["prefix_task_rows"]
            if init == MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS:
                cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
            else:
                task = config.prompt_tuning_init_task
                cols, rows = cols[task].unsqueeze(0), rows[task].unsqueeze(0)
            tensors["prefix_task_cols"] = (self.prefix_task_cols, cols)
            tensors["prefix_task_rows"] = (self.prefix_task_rows, rows)
        for name, (mine, theirs) in tensors.items():
            if mine.shape != theirs.shape:
                raise ConfigError(f"MultitaskPromptTuningConfig.prompt_tuning_init={init.value!r}: the source "
                                  f"file's {name} has shape {tuple(theirs.shape)}, this adapter's is "
                                  f"{tuple(mine.shape)} (num_tasks must be 1 unless ONLY_SOURCE_SHARED)")
        for mine, theirs in tensors.values():
            mine.copy_(theirs)

    @classmethod
    def param_count(cls, base: nn.Module, config: MultitaskPromptTuningConfig, key: str = "") -> int:
        n, d, k = config.total_virtual_tokens, config.token_dim, config.num_ranks
        return n * d + config.num_tasks * (n * k + k * d)

    # -- the call's task ids --------------------------------------------------------------------------------
    @classmethod
    def call_context(cls, model: Any, call: dict[str, Any]) -> Any:
        """Take ``task_ids`` out of the call (kept in ``call["task_ids"]`` for other methods routed by task), check
        it against the active adapter's ``num_tasks`` and the batch, and hold it for the call."""
        if "task_ids" not in call:
            call["task_ids"] = call["kwargs"].pop("task_ids", None)
        ids = call["task_ids"]
        name = next((n for n in model.active_adapters
                     if isinstance(model.peft_config.get(n), MultitaskPromptTuningConfig)), None)
        if name is None:
            return None
        n_tasks, who = model.peft_config[name].num_tasks, f"multitask prompt adapter {name!r}"
        if ids is None:
            if n_tasks == 1 or any(l.disable_adapters for _, l in model.base_model.adapter_layers()):
                return _task_scope(None)
            raise ValueError(f"task_ids: required by {who} (num_tasks={n_tasks}): pass one integer per batch row, "
                             f"each in [0, {n_tasks}), as model(..., task_ids=...)")
        return _task_scope(check_task_ids(ids, n_tasks, batch_rows(call), who))

    # -- the prompts ----------------------------------------------------------------------------------------
    def task_prompts(self, rows: int) -> Tensor:
        """Per batch row, its task's prompt ``P * (u_t v_t)`` (rows, n * S, d)."""
        ids = _LOCAL.task_ids
        if ids is None:
            ids = torch.zeros(rows, dtype=torch.long)
        elif ids.shape[0] != rows:
            if ids.shape[0] == 0 or rows % ids.shape[0]:
                raise ValueError(f"task_ids: {ids.shape[0]} ids for a batch of {rows} rows; give one per row")
            ids = ids.repeat_interleave(rows // ids.shape[0])
        ids = ids.to(self.prefix_task_cols.device)
        update = torch.matmul(self.prefix_task_cols.index_select(0, ids), self.prefix_task_rows.index_select(0, ids))
        return self.embedding.weight * update

    def rewrite(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        return embed_prompts(model, kwargs, self.num_virtual_tokens, lambda: self.task_prompts(batch_size(kwargs)))

    def rewrite_encoder(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        prompts = self.task_prompts(batch_size(kwargs))
        return embed_encoder_prompts(model, kwargs, prompts[:, : self.num_virtual_tokens])

    def file_tensors(self, for_save: bool) -> dict[str, Tensor]:
        return {"prompt_embeddings": self.embedding.weight, "prefix_task_cols": self.prefix_task_cols,
                "prefix_task_rows": self.prefix_task_rows}
