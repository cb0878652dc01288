"""``peftkit bench`` cells that need more than a config: X-LoRA's seeded experts, CPT's type masks."""

from __future__ import annotations

import os

import peft
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.bench import cells
from peftkit.bench import measure as M
from peftkit.bench.grid import MODELS, cell_config, resolve_methods

torch.set_num_threads(1)
LLAMA = MODELS["llama-tiny"]


def _cell(name):
    choice = resolve_methods(name)[0]
    return choice, cell_config(choice, LLAMA, None)[0]


def test_xlora_cell_writes_seeded_experts_both_libraries_read():
    choice, config = _cell("xlora")
    with cells.prepared(choice, LLAMA, config) as (model, cfg):
        folders = cfg["adapters"]
        assert set(folders) == {"0", "1"} and cfg["hidden_size"] == 64
        assert all(os.path.isfile(os.path.join(p, "adapter_model.safetensors")) for p in folders.values())
        assert model.build().config.use_cache is False
        ours = peftkit.get_peft_model(model.build(), peftkit.XLoraConfig(**cfg))
        theirs = peft.get_peft_model(model.build(), peft.XLoraConfig(**cfg))
        # the scaling head: Linear(64, 8) + Linear(8, 2 experts)
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
        assert ours.get_nb_trainable_parameters()[0] == 8 * 65 + 2 * 9
        tensors = load_file(os.path.join(folders["1"], "adapter_model.safetensors"))
        assert all(t.abs().sum() > 0 for t in tensors.values())  # seeded, non-zero A and B
        assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {2}  # the rank-2 expert
    assert not any(os.path.exists(p) for p in folders.values())  # the folder lives as long as the cell


def test_cpt_cell_batches_carry_type_masks_and_steps_pass_copies():
    choice, config = _cell("cpt")
    with cells.prepared(choice, LLAMA, config) as (model, cfg):
        theirs = peft.get_peft_model(model.build(), peft.CPTConfig(**cfg))
        batch = model.batch(theirs, 2, 8)
        assert batch["input_type_mask"].tolist() == [[1, 1, 2, 2, 3, 3, 4, 4]] * 2
        assert "input_type_mask" not in model.batch(theirs, 2, 8, labels=False)
        M.train_step(theirs, M.make_optimizer(theirs), batch)  # peft shifts the mask it is given in place
        assert batch["input_type_mask"].tolist() == [[1, 1, 2, 2, 3, 3, 4, 4]] * 2
    choice, config = _cell("lora")
    with cells.prepared(choice, LLAMA, config) as (model, cfg):  # other methods: as given
        assert model is LLAMA and cfg is config
