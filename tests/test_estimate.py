"""peftkit estimate: exact parameter counts from a meta-device model, parts that add up and scale as they
should, the CLI's JSON, and one prediction checked against a measured peak RSS (fresh subprocess)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

from peftkit import LoraConfig, get_peft_model
from peftkit.cli import main
from peftkit.estimate import MB, estimate, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parts_match_a_real_model():
    from transformers import AutoModelForCausalLM

    res = estimate("llama-tiny", r=8, batch=2, seq=16)
    model = AutoModelForCausalLM.from_config(load_config("llama-tiny"))
    n_base = sum(p.numel() for p in model.parameters())
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    parts = res["parts"]
    # 2 layers x r x (q, o: 64 + 64; k, v: 64 + 32 (2 kv heads of 16); gate, up, down: 64 + 128)
    assert res["trainable_params"] == trainable == 2 * 8 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    assert parts["weights"] == pytest.approx(n_base * 4 / MB, abs=0.05)
    assert parts["adapter"] == parts["gradients"] == pytest.approx(trainable * 4 / MB, abs=0.05)
    assert parts["optimizer"] == pytest.approx(trainable * 12 / MB, abs=0.05)
    assert res["predicted_peak_mb"] == pytest.approx(sum(parts.values()), abs=0.2)


def test_quantized_weights_and_scaling():
    fp = estimate("llama-small", r=16, batch=4, seq=64)
    q4 = estimate("llama-small", r=16, batch=4, seq=64, quant="4bit")
    q8 = estimate("llama-small", r=16, batch=4, seq=64, quant="8bit")
    # embeddings and lm_head (2 x 8000 x 512) stay fp32; the Linear layers take 4.125 / 8 bits per weight
    linear = 4 * (2 * 512 * 512 + 2 * 512 * 256 + 3 * 512 * 1408)  # 4 layers; k, v: 4 kv heads of 64
    fixed = 2 * 8000 * 512 * 4 / MB + (4 * 2 + 1) * 512 * 4 / MB
    assert q4["parts"]["weights"] == pytest.approx(fixed + linear * (0.5 + 1 / 64) / MB, abs=0.2)
    assert q8["parts"]["weights"] == pytest.approx(fixed + linear / MB, abs=0.2)
    assert q4["trainable_params"] == fp["trainable_params"]
    big = estimate("llama-small", r=16, batch=8, seq=64)
    assert big["parts"]["activations"] == pytest.approx(2 * fp["parts"]["activations"], rel=0.02)
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        estimate("no-such-model")
    with pytest.raises(ValueError, match="quant='3bit'"):
        estimate("llama-tiny", quant="3bit")


def test_cli_json():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["estimate", "llama-tiny", "--method", "lora", "--r", "16", "--batch", "2", "--seq", "32",
                   "--quant", "4bit", "--json"])
    data = json.loads(out.getvalue())
    assert rc == 0 and set(data) == {"predicted_peak_mb", "parts"}
    assert set(data["parts"]) == {"weights", "adapter", "gradients", "optimizer", "activations", "runtime"}
    assert data == {k: v for k, v in estimate("llama-tiny", r=16, batch=2, seq=32, quant="4bit").items()
                    if k in data}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["estimate", "nowhere/model"]) == 2
    assert "unknown model" in err.getvalue()


def test_prediction_within_15_percent_of_measured_peak():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    script = os.path.join(ROOT, "benchmarks", "bench_estimate.py")
    out = subprocess.run([sys.executable, script, "--child", "llama-small", "4", "128", "16", "none"],
                         capture_output=True, text=True, env=env, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    predicted = estimate("llama-small", r=16, batch=4, seq=128)["predicted_peak_mb"]
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)
