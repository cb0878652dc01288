"""Data-parallel `peftkit train` under torchrun: 2 CPU processes (gloo) at batch B train the same adapter as
one process at batch 2B, and only the adapter's gradients are all-reduced."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from peftkit.train import load_recipe, train

from .train_helpers import env, text_recipe

STEPS = ["train.max_steps=6", "train.save_every=0", "train.log_every=3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(recipe, *overrides) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "peftkit.cli", "train", str(recipe), *overrides]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _two_processes(tmp_path, *overrides):
    """(single-process run at batch 8, summary and weights of a 2-process run at batch 4)."""
    one = load_recipe(str(text_recipe(tmp_path / "one")), [*STEPS, "train.batch_size=8"])
    single = train(one, quiet=True)
    recipe = text_recipe(tmp_path / "two")
    _torchrun(recipe, *STEPS, "train.batch_size=4", *overrides)
    run_dir = tmp_path / "two" / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    a = load_file(os.path.join(one.output_dir, "adapter", "adapter_model.safetensors"))
    b = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    return single, summary


def test_two_processes_match_one_process_with_the_doubled_batch(tmp_path):
    single, summary = _two_processes(tmp_path)
    # every optimizer step all-reduces exactly the trainable parameters' gradients, nothing of the base
    assert summary["trainable_params"] == single["trainable_params"]
    assert summary["allreduced_numel"] == 6 * summary["trainable_params"]


def test_fsdp_two_processes_match_one_process_with_the_doubled_batch(tmp_path):
    single, summary = _two_processes(tmp_path, "train.strategy=fsdp")
    assert summary["trainable_params"] == single["trainable_params"]
    assert summary["test_accuracy"] == single["test_accuracy"]


def test_fsdp_checkpoint_resumes_to_the_same_adapter(tmp_path):
    """A 2-rank FSDP run checkpoints at step 3 (adapter and optimizer state gathered from the shards); a
    second run resumes from it and ends with the adapter of the uninterrupted run, and so does a
    single-process run resuming the same checkpoint."""
    recipe = text_recipe(tmp_path, peft={"r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                                         "target_modules": ["query", "value"]})
    common = ["train.max_steps=6", "train.save_every=3", "train.keep_last=1", "train.log_every=3",
              "train.batch_size=4", "train.strategy=fsdp"]
    _torchrun(recipe, *common)
    run_dir = tmp_path / "run"
    final = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    ckpt = run_dir / "checkpoints" / "step-0000003"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["step"] == 3 and len(state["rng_ranks"]) == 2 and state["trainable"]
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert not any(torch.equal(saved[k], final[k]) for k in final if "lora_B" in k)  # mid-run weights differ

    (run_dir / "adapter" / "adapter_model.safetensors").unlink()
    out = _torchrun(recipe, *common, "resume=true")
    assert f"resumed from {ckpt} (step 3)" in out
    resumed = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == final.keys()
    for k in final:
        torch.testing.assert_close(resumed[k], final[k], atol=1e-6, rtol=0)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 3, 6, 6]  # eval at 0, losses at 3 and 6, final eval: nothing logged twice
