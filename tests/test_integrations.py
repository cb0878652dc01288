"""The tools that drive PEFT models (transformers' Trainer, trl, diffusers, accelerate) with a peftkit model.

Each workflow runs in a child process that serves peftkit as ``peft`` (``PEFTKIT_SERVE_AS_PEFT=1``, as a
user with peft also installed would run it; see peftkit.compat), and writes what it saw into result.json.
This process keeps the real peft: it checks the folders the workflows wrote with peft itself and runs the
peft references (label-smoothed loss, file keys).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftkit
from tests.integration.diffusers_workflow import TARGETS, X, ENC, T, unet
from tests.integration.common import tiny_llama, token_rows

ROOT = Path(__file__).resolve().parents[1]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]
FULL_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}


def _child_env(serve: str | None = "1") -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("PEFTKIT_SERVE_AS_PEFT", None)
    if serve is not None:
        env["PEFTKIT_SERVE_AS_PEFT"] = serve
    return env


def _workflow(name: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp(name)
    proc = subprocess.run([sys.executable, "-m", f"tests.integration.{name}", str(out)], cwd=ROOT, env=_child_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "result.json").read_text())


def _run_once(name: str):  # noqa: ANN202 - a module-scoped fixture running one workflow
    @pytest.fixture(scope="module")
    def run(tmp_path_factory):
        return _workflow(name, tmp_path_factory)

    return run


trainer_run = _run_once("trainer_workflow")
trl_run = _run_once("trl_workflow")
diffusers_run = _run_once("diffusers_workflow")
accelerate_run = _run_once("accelerate_workflow")


def _adapter_only(files: dict[str, list[str]], folder: str) -> None:
    names = set(files[folder])
    assert set(ADAPTER_FILES) <= names, (folder, names)
    assert not names & FULL_MODEL_FILES, (folder, names)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


# -- transformers.Trainer ---------------------------------------------------------------------------------
def test_trainer_checkpoints_are_adapter_folders_that_peft_loads(trainer_run):
    out, result = trainer_run
    for folder in ("run/checkpoint-2", "run/checkpoint-4", "run/final", "resumed", "gc/final", "qlora/final"):
        _adapter_only(result["files"], folder)
    from transformers import LlamaForCausalLM

    ids = torch.stack([r["input_ids"] for r in token_rows(2)])
    with torch.no_grad():
        ours = peftkit.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(out / "base"), out / "run/final")
        theirs = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(out / "base"), out / "run/final")
        plain = LlamaForCausalLM.from_pretrained(out / "base")(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-6, rtol=0)
        assert (ours(input_ids=ids).logits - plain).abs().max() > 1e-4  # the adapter trained


def test_trainer_label_smoothing_loss_equals_peft(trainer_run, tmp_path):
    """Trainer shifts labels only for a model it recognises as a PEFT causal LM; the first step's loss (the
    adapter starts as the identity) must equal peft's, and differ from the unshifted loss."""
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    out, result = trainer_run
    torch.manual_seed(1)
    model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(out / "base"),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2,
                             report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0,
                             label_smoothing_factor=0.1, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=token_rows())
    trainer.train()
    peft_first = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    assert abs(result["losses"][0] - peft_first) <= 1e-5
    # the loss a model the Trainer does not recognise gets (labels not shifted) is another number
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        logits = LlamaForCausalLM.from_pretrained(out / "base")(input_ids=batch["input_ids"]).logits
    unshifted = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), label_smoothing=0.1)
    assert abs(unshifted.item() - peft_first) > 1e-3


def test_trainer_resume_and_gradient_checkpointing_give_the_same_adapter(trainer_run):
    out, result = trainer_run
    assert result["resumed_step"] == 4
    final = _weights(out / "run/final")
    assert sorted(final) == result["keys"]
    _close(_weights(out / "resumed"), final)
    _close(_weights(out / "gc/final"), final)


def test_trainer_trains_lora_on_a_4bit_base(trainer_run):
    out, result = trainer_run
    assert result["is_quantized"] and len(result["qlora_losses"]) == 2
    trained = _weights(out / "qlora/final")
    assert all(trained[k].abs().max() > 0 for k in trained if "lora_B" in k)


# -- trl ----------------------------------------------------------------------------------------------------
def test_trl_sft_and_dpo_train_and_save_adapters(trl_run):
    out, result = trl_run
    assert result["sft_steps"] == 3 and result["dpo_steps"] == 3
    assert result["sft_changed"] and result["dpo_changed"]
    for folder in ("sft/checkpoint-3", "sft/final", "dpo/checkpoint-3", "dpo/final", "dpo/final/ref"):
        _adapter_only(result["files"], folder)
    # DPO's reference is the adapter trl copies as "ref": the preference margin grows from 0
    assert result["dpo_margins"][0] == 0 and result["dpo_margins"][-1] > 0
    assert result["dpo_losses"][-1] < result["dpo_losses"][0]
    from transformers import LlamaForCausalLM

    loaded = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(out / "base"), out / "sft/final")
    assert isinstance(loaded, peft.PeftModel)


# -- diffusers ---------------------------------------------------------------------------------------------
def test_diffusers_adapter_methods_with_peftkit_configs(diffusers_run):
    _, result = diffusers_run
    assert result["config_type"] == "peftkit.methods.lora.config"
    assert result["acts"] > 1e-3  # the adapter changes the output
    assert result["half_vs_ref"] <= 1e-6 and result["half_vs_full"] > 1e-3  # set_adapters(weights=[0.5])
    for key in ("restored", "disabled", "reloaded", "pipeline", "hotswap"):
        assert result[key] <= 1e-6, key
    assert result["hotswap_changed"] > 1e-3  # load_lora_adapter(hotswap=True) replaced the weights
    assert result["pipe_adapters"] == ["c"]
    assert result["bare_config"] == ["x"]


def test_diffusers_files_and_keys_match_peft(diffusers_run):
    """Keys equal peft's for the same config; the LoRA files the peftkit run saved load in diffusers + peft."""
    out, result = diffusers_run
    ref = unet()
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS), ref)
    assert result["keys"] == sorted(peft.get_peft_model_state_dict(ref))
    bare = unet()
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["to_q"]), bare)
    assert result["bare_keys"] == sorted(peft.get_peft_model_state_dict(bare))
    outputs = load_file(out / "outputs.safetensors")
    loaded = unet()
    loaded.load_lora_adapter(str(out / "unet_lora"), weight_name="pytorch_lora_weights.safetensors", prefix=None)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X, T, ENC).sample, outputs["full"], atol=1e-6, rtol=0)


# -- accelerate, transformers' load_adapter -----------------------------------------------------------------
def test_accelerate_prepare_and_transformers_load_adapter(accelerate_run):
    _, result = accelerate_run
    assert result["is_peft_model"] and result["unwrapped_is_peftkit"]
    assert result["losses"][-1] < result["losses"][0]
    assert result["load_adapter_gap"] <= 1e-6 and result["load_adapter_configs"] == ["default"]


# -- when peftkit serves `peft` ------------------------------------------------------------------------------
HIDE_REAL_PEFT = """
import importlib.machinery, sys
PF = importlib.machinery.PathFinder
class NoPeft(PF):  # this interpreter as if peft were not installed
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name == "peft" or name.startswith("peft.") else PF.find_spec(name, path, target)
    @classmethod
    def find_distributions(cls, *args, **kwargs):
        return (d for d in PF.find_distributions(*args, **kwargs) if d.metadata["Name"] != "peft")
sys.meta_path[:] = [NoPeft if f is PF else f for f in sys.meta_path]
"""


def _child(code: str, serve: str | None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_child_env(serve), capture_output=True,
                          text=True, timeout=300)


def test_serves_peft_when_the_real_one_is_absent():
    code = HIDE_REAL_PEFT + """
import importlib.util
assert importlib.util.find_spec("peft") is None
import peftkit, peft, importlib.metadata
from transformers.utils import is_peft_available
assert peft.PeftModel is peftkit.PeftModel and is_peft_available()
print(importlib.metadata.version("peft"))
"""
    proc = _child(code, serve=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "0.21.2"


def test_real_peft_stays_unless_asked():
    proc = _child("import peftkit, peft; print(peftkit.compat.serving_as_peft(), peft.__file__)", serve=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served, path = proc.stdout.split()
    assert served == "False" and path.endswith(os.path.join("peft", "__init__.py"))
    # this process imported the real peft: serving it now is refused with the way out
    with pytest.raises(RuntimeError, match="before anything imports peft"):
        peftkit.serve_as_peft()
    proc = _child("import peftkit", serve="maybe")
    assert proc.returncode != 0 and "PEFTKIT_SERVE_AS_PEFT='maybe'" in proc.stderr


def test_served_modules_name_what_is_missing():
    proc = _child("import peftkit\ntry:\n    import peft.tuners.xlora\nexcept ModuleNotFoundError as e:\n    print(e)", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "peft.tuners.xlora" in proc.stdout and "peft.tuners.lora" in proc.stdout


def test_a_tool_bound_to_the_real_peft_gets_a_warning_naming_the_fix():
    code = """
import warnings
import peft, peftkit
from transformers import Trainer
from transformers import LlamaConfig, LlamaForCausalLM
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    peftkit.get_peft_model(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=2)), peftkit.LoraConfig(r=2))
print([str(w.message) for w in caught if "PEFTKIT_SERVE_AS_PEFT=1" in str(w.message)])
"""
    proc = _child(code, serve=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "transformers.trainer" in proc.stdout and "whole model" in proc.stdout
