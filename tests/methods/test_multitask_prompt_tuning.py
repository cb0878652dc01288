"""Multitask prompt tuning: config compatibility with Hugging Face PEFT, the per-task prompt, task_ids per call
(forward and generate, checked before anything runs), files both ways, init from a source file, bad input."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.prompt import MultitaskPromptTuningConfig

from ..families import FAMILY, V
from ..parity import assert_loads_both_ways, perturb, train_a_little
from ..parity import field_defaults

TASKS = torch.tensor([2, 0, 1])
KW = dict(task_type="CAUSAL_LM", num_virtual_tokens=3, num_tasks=3, num_ranks=2)


def _ids(rows: int = 3, length: int = 6) -> torch.Tensor:
    return torch.randint(1, V, (rows, length), generator=torch.Generator().manual_seed(11))


def _pair(seed: int = 5, **kw):
    """peft's and peftkit's models from the same seed (the same draws), peft's given peftkit's pushed tensors."""
    kw = {**KW, **kw}
    ref, mine = FAMILY["llama"].model(), FAMILY["llama"].model()
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(ref, peft.MultitaskPromptTuningConfig(**kw)).eval()
    torch.manual_seed(seed)
    ours = peftkit.get_peft_model(mine, MultitaskPromptTuningConfig(**kw)).eval()
    return theirs, ours


def test_config_fields_and_defaults_match_peft(tmp_path):
    assert field_defaults(MultitaskPromptTuningConfig) == field_defaults(peft.MultitaskPromptTuningConfig)
    peft.MultitaskPromptTuningConfig(num_virtual_tokens=5, num_tasks=4, num_ranks=3).save_pretrained(tmp_path / "a")
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, MultitaskPromptTuningConfig) and (loaded.num_tasks, loaded.num_ranks) == (4, 3)
    MultitaskPromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="EXACT_SOURCE_TASK",
                                prompt_tuning_init_state_dict_path="x.safetensors",
                                prompt_tuning_init_task=2).save_pretrained(tmp_path / "b")
    back = peft.PeftConfig.from_pretrained(tmp_path / "b")
    assert isinstance(back, peft.MultitaskPromptTuningConfig) and back.prompt_tuning_init == "EXACT_SOURCE_TASK"


@pytest.mark.parametrize("bad", [{"num_tasks": 0}, {"num_ranks": 0}, {"prompt_tuning_init": "SAMPLE_VOCAB"},
                                 {"prompt_tuning_init": "AVERAGE_SOURCE_TASKS"}, {"prompt_tuning_init_task": -1},
                                 {"prompt_tuning_init": "TEXT"}])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError):
        MultitaskPromptTuningConfig(num_virtual_tokens=2, **bad)


def test_same_state_outputs_and_per_task_prompts_as_peft():
    theirs, ours = _pair()
    ref, mine = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    assert {k: tuple(v.shape) for k, v in mine.items()} == {
        "prompt_embeddings": (3, 32), "prefix_task_cols": (3, 3, 2), "prefix_task_rows": (3, 2, 32)}
    assert ref.keys() == mine.keys() and all(torch.equal(ref[k], mine[k]) for k in ref)  # the same draws
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] == 3 * 32 + 3 * (3 * 2 + 2 * 32)
    adapter = next(a for _, a in ours.base_model.adapters("default"))
    from peftkit.methods.prompt.multitask import _task_scope
    with _task_scope(TASKS), torch.no_grad():  # P * (u_t v_t), row by row
        expected = torch.stack([mine["prompt_embeddings"] * (mine["prefix_task_cols"][t] @ mine["prefix_task_rows"][t])
                                for t in TASKS.tolist()])
        torch.testing.assert_close(adapter.task_prompts(3), expected)
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids(), task_ids=TASKS).logits, theirs(_ids(), task_ids=TASKS).logits,
                                   atol=1e-5, rtol=0)


def _train(model, family) -> None:
    train_a_little(model, family)
    perturb(model)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_files_load_both_ways_with_task_ids(family, tmp_path):
    fam = FAMILY[family]
    fam = dataclasses.replace(fam, inputs=lambda f=fam: {**f.inputs(), "task_ids": torch.tensor([1, 2])},
                              output=lambda o: o.logits[:, -2:])  # the real tokens' last positions (CAUSAL_LM)
    kw = {**KW, "task_type": fam.task_type or "CAUSAL_LM"}
    assert_loads_both_ways(fam, peft.MultitaskPromptTuningConfig(**kw), MultitaskPromptTuningConfig(**kw), tmp_path,
                           train=_train)


def _generate(model, ids, tasks, use_cache, **kw):
    return model.generate(input_ids=ids, task_ids=tasks, max_new_tokens=4, do_sample=False, use_cache=use_cache,
                          pad_token_id=0, **kw)


def test_generate_with_task_ids_with_and_without_cache():
    """Without a cache peftkit's tokens are peft's; with a cache they are the same (peft 0.21.2 re-injects the
    prompt at every cached step under transformers 5, so its cached generation is not compared)."""
    theirs, ours = _pair()
    perturb(ours, scale=0.5)
    peft.set_peft_model_state_dict(theirs, {k: v.detach().clone() for k, v in
                                            peftkit.get_peft_model_state_dict(ours).items()})
    ids = _ids(3, 5)
    expected = _generate(theirs, ids, TASKS, False)
    assert torch.equal(_generate(ours, ids, TASKS, False), expected)
    assert torch.equal(_generate(ours, ids, TASKS, True), expected)
    assert not torch.equal(_generate(ours, ids, torch.tensor([0, 0, 0]), True), expected)  # the task matters
    beams = _generate(ours, ids, TASKS, True, num_beams=2)  # the expanded batch keeps each row's task
    assert torch.equal(beams, torch.cat([_generate(ours, ids[i:i + 1], TASKS[i:i + 1], True, num_beams=2)
                                         for i in range(3)]))


@pytest.mark.parametrize(("tasks", "match"), [
    (None, r"task_ids: required .*num_tasks=3.*\[0, 3\)"), (torch.tensor([0, 3, 1]), r"task_ids.*\[0, 3\)"),
    (torch.tensor([0, -1, 1]), r"task_ids.*\[0, 3\)"), (torch.tensor([0, 1]), r"task_ids.*2 ids for 3 rows"),
])
def test_bad_task_ids_fail_before_any_computation(tasks, match):
    _, ours = _pair()
    ran = []
    handle = ours.get_base_model().get_input_embeddings().register_forward_pre_hook(lambda *a: ran.append(1))
    with pytest.raises(ValueError, match=match):
        ours(_ids(), task_ids=tasks)
    with pytest.raises(ValueError, match=match):
        ours.generate(input_ids=_ids(), task_ids=tasks, max_new_tokens=2)
    handle.remove()
    assert not ran


@pytest.mark.parametrize("init", ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"])
def test_init_from_a_source_file_as_peft(init, tmp_path):
    _, source = _pair()
    perturb(source)
    source.save_pretrained(tmp_path / "src")
    path = str(tmp_path / "src" / "adapter_model.safetensors")
    kw = {**KW, "num_tasks": 1, "prompt_tuning_init": init, "prompt_tuning_init_state_dict_path": path,
          "prompt_tuning_init_task": 2}
    theirs, ours = _pair(**kw)
    ref, mine = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    assert all(torch.equal(ref[k], mine[k]) for k in ref), init
    src = peftkit.get_peft_model_state_dict(source)
    assert torch.equal(mine["prompt_embeddings"], src["prompt_embeddings"])
    if init == "EXACT_SOURCE_TASK":
        assert torch.equal(mine["prefix_task_rows"][0], src["prefix_task_rows"][2])
    bad = {**kw, "num_tasks": 2}
    if init != "ONLY_SOURCE_SHARED":
        with pytest.raises(ConfigError, match="num_tasks"):
            peftkit.get_peft_model(FAMILY["llama"].model(), MultitaskPromptTuningConfig(**bad))
