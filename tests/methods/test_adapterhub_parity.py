"""Parity with AdapterHub's ``adapters`` package (1.3.0) on a tiny BERT: same trainable-parameter counts and,
with AdapterHub's weights copied into peftkit's adapters by an explicit key mapping, the same outputs (1e-5).

The reference numbers come from ``scripts/adapterhub_fixture.py``, run in an environment with ``adapters``
(which pins transformers 4.x); this test runs in the project's environment and never imports ``adapters``.
The conventions that differ, and the options that reproduce AdapterHub's, are in docs/compatibility.md.
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest
import torch

from peftkit import get_peft_model
from peftkit.layers import adapter_layers
from peftkit.methods.adapters.bottleneck import HoulsbyConfig, ParallelAdapterConfig, PfeifferConfig
from peftkit.methods.adapters.compacter import CompacterConfig, CompacterPlusPlusConfig
from peftkit.methods.adapters.hybrid import MamConfig, UniPeltConfig

safetensors = pytest.importorskip("safetensors.torch")

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "adapterhub"
META = json.loads((FIXTURE / "meta.json").read_text())
PREFIX = {"num_virtual_tokens": 3, "prefix_projection": True, "encoder_hidden_size": 16}

# AdapterHub config (as in the fixture) -> the peftkit config with the options that reproduce it
CONFIGS = {
    # DoubleSeqBnConfig: after both sublayer outputs, before their residual + LayerNorm; swish
    "double_seq_bn": lambda: HoulsbyConfig(bottleneck_size=8, non_linearity="swish"),
    # SeqBnConfig: original_ln_before=True (reads LN(h + r), adds back before the same LayerNorm)
    "seq_bn": lambda: PfeifferConfig(reduction_factor=4, original_ln_before=True),
    # ParBnConfig: beside the FFN (reads the FFN input), scaling 4
    "par_bn": lambda: ParallelAdapterConfig(bottleneck_size=8, scaling=4.0),
    "compacter": lambda: CompacterConfig(reduction_factor=4),
    "compacter_pp": lambda: CompacterPlusPlusConfig(reduction_factor=4, original_ln_before=True),
    "mam": lambda: MamConfig(parts={"prefix_tuning": PREFIX,
                                    "parallel_adapter": {"bottleneck_size": 8, "scaling": 4.0}}),
    # gated LoRA: AdapterHub drops alpha / r when gating, so alpha = r here (see docs/compatibility.md)
    "unipelt": lambda: UniPeltConfig(parts={"prefix_tuning": PREFIX,
                                            "pfeiffer": {"reduction_factor": 4, "original_ln_before": True},
                                            "lora": {"r": 2, "lora_alpha": 2}}),
}


def bert():
    from transformers import BertConfig, BertModel

    cfg = META["bert_config"]
    model = BertModel(BertConfig(**cfg)).eval()
    state = safetensors.load_file(str(FIXTURE / "base.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    return model


# -- AdapterHub key -> (peftkit module path, peftkit parameter) ------------------------------------------------
_BN = {"adapter_down.0.weight": "down_weight", "adapter_down.0.bias": "down_bias",
       "adapter_up.weight": "up_weight", "adapter_up.bias": "up_bias"}
# PHM layer: W_i = W_left_i W_right_i is (d_in/n, d_out/n), i.e. t_i s_i^T; the bias is "b"
_PHM = {"adapter_down.0.W_left": ("down_t", lambda w: w[:, :, 0]),
        "adapter_down.0.W_right": ("down_s", lambda w: w[:, 0]), "adapter_down.0.b": ("down_bias", None),
        "adapter_up.W_left": ("up_t", lambda w: w[:, :, 0]), "adapter_up.W_right": ("up_s", lambda w: w[:, 0]),
        "adapter_up.b": ("up_bias", None)}


def _sublayer(loc: str, original_ln_before: bool, parallel: bool) -> str:
    """AdapterHub hosts a bottleneck adapter on BertSelfOutput ("attention.output") / BertOutput ("output")."""
    if parallel:  # peftkit's split-FFN parallel adapter keeps its parameters on the FFN's input Linear
        return loc.replace("output", "intermediate") + ".dense"
    return loc + (".LayerNorm" if original_ln_before else ".dense")


def peftkit_params(name: str, ah: dict[str, torch.Tensor], config) -> dict[tuple[str, str], torch.Tensor]:
    """AdapterHub's tensors under peftkit's (module path, parameter) names; every AdapterHub key is mapped."""
    out: dict[tuple[str, str], torch.Tensor] = {}
    parts = getattr(config, "parts", None) or {}
    bn = parts.get("pfeiffer") or parts.get("parallel_adapter") or config.__dict__
    ln_before = bool(bn.get("original_ln_before", False))
    parallel = bn.get("mode") == "parallel" or "parallel_adapter" in parts
    hybrid = bool(parts)

    def part(param: str, which: str) -> str:  # inside a hybrid the parameters live under the part's name
        return f"{which}|{param}" if hybrid else param

    bn_name = "pfeiffer" if "pfeiffer" in parts else "parallel_adapter"
    for key, value in ah.items():
        if key == f"shared_parameters.{name}.phm_rule":  # C_i (n, n, n); peftkit's A_i = C_i^T, on the owner layer
            out[(config.shared_owner, "phm_rule")] = value.transpose(1, 2)
            continue
        m = re.fullmatch(rf"(encoder\.layer\.\d+\.(?:attention\.)?output)\.adapters\.{name}\.(.+)", key)
        if m:
            path = _sublayer(m.group(1), ln_before, parallel)
            if m.group(2) in _BN:
                out[(path, part(_BN[m.group(2)], bn_name))] = value
            elif m.group(2) in _PHM:
                param, fn = _PHM[m.group(2)]
                out[(path, param)] = fn(value) if fn else value
            elif m.group(2).startswith("gate."):
                out[(path, f"{bn_name}|{m.group(2)}")] = value
            else:
                raise KeyError(key)
            continue
        m = re.fullmatch(rf"(encoder\.layer\.\d+\.attention\.self\.(?:query|value))\.loras\.{name}\.(.+)", key)
        if m:
            out[(m.group(1), f"lora|{m.group(2)}")] = value  # lora_A (r, d_in), lora_B (d_out, r), gate.*
            continue
        m = re.fullmatch(rf"(encoder\.layer\.\d+\.attention\.self)\.prefix_tuning\.prefix_gates\.{name}\.(weight|bias)",
                         key)
        if m:  # UniPELT's prefix gate (one output: AdapterHub's shared_gating) on the layer's query projection
            out[(m.group(1) + ".query", f"prefix_tuning|gate.{m.group(2)}")] = value
            continue
        m = re.fullmatch(rf".*\.prefix_tunings\.{name}\.self_prefix\.(wte|control_trans\.[02])\.(.+)", key)
        if m:  # the reparameterisation MLP: Embedding(n, d) - Linear(d, h) - tanh - Linear(h, 2 L d)
            sub = {"wte": "embedding", "control_trans.0": "transform.0", "control_trans.2": "transform.2"}[m.group(1)]
            out[("embeddings.word_embeddings", f"prefix_tuning|{sub}.{m.group(2)}")] = value
            continue
        raise KeyError(f"unmapped AdapterHub key {key}")
    return out


def _param(adapter, name: str) -> torch.Tensor:
    """A parameter of a (hybrid) adapter by peftkit name: "<part>|<dotted param>" or "<dotted param>"."""
    if "|" in name:
        part, _, rest = name.partition("|")
        owner = adapter.gates[part] if rest.startswith("gate.") else adapter.parts[part]
        rest = rest[5:] if rest.startswith("gate.") else rest
    else:
        owner, rest = adapter, name
    return owner.get_parameter(rest)


@pytest.fixture(scope="module")
def inputs():
    return safetensors.load_file(str(FIXTURE / "inputs.safetensors"))


@pytest.fixture(scope="module")
def expected():
    return safetensors.load_file(str(FIXTURE / "outputs.safetensors"))


def test_base_model_matches(inputs, expected):
    with torch.no_grad():
        out = bert()(**inputs).last_hidden_state
    torch.testing.assert_close(out, expected["base"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_and_counts_match_adapterhub(name, inputs, expected):
    config = CONFIGS[name]()
    model = get_peft_model(bert(), config).eval()
    assert model.get_nb_trainable_parameters()[0] == META["adapters"][name]["trainable_parameters"]
    ah = safetensors.load_file(str(FIXTURE / META["adapters"][name]["file"]))
    mapped = peftkit_params(name, ah, model.peft_config["default"])
    base = model.get_base_model()
    ours = {p: (path, pname) for path, layer in adapter_layers(base) if "default" in layer.adapters
            for pname, p in layer.adapters["default"].named_parameters()}
    with torch.no_grad():
        copied = set()
        for (path, pname), value in mapped.items():
            p = _param(base.get_submodule(path).adapters["default"], pname)
            assert p.shape == value.shape, (path, pname, p.shape, value.shape)
            p.copy_(value)
            copied.add(p)
    left = [ours[p] for p in set(ours) - copied]
    assert not left and len(copied) == len(ours), f"peftkit parameters without an AdapterHub value: {left}"
    kwargs = dict(inputs)
    if "prefix_tuning" in getattr(config, "parts", {}):
        # peftkit numbers the real tokens after the virtual ones (as PEFT does, through the cache); AdapterHub
        # starts them at 0: given position ids are shifted by n, so these become 0..L-1
        n = PREFIX["num_virtual_tokens"]
        kwargs["position_ids"] = torch.arange(inputs["input_ids"].shape[1]).expand_as(inputs["input_ids"]) - n
    with torch.no_grad():
        out = model(**kwargs).last_hidden_state
    assert not torch.allclose(out, expected["base"], atol=1e-3)  # the adapter does act
    torch.testing.assert_close(out, expected[name], atol=1e-5, rtol=0)


def test_fixture_is_small():
    assert sum(f.stat().st_size for f in FIXTURE.iterdir()) < 1_000_000
