"""Default targets follow Hugging Face PEFT's per-model tables: every model type in them has a default here,
and on real (tiny) architectures ``LoraConfig()`` / ``IA3Config()`` adapt exactly the modules PEFT adapts."""

from __future__ import annotations

import copy
import json
import re
import warnings

import peft
import pytest
import torch
from peft.utils import constants as peft_constants
from transformers import AutoConfig, AutoModel

import peftkit
from peftkit.config import ConfigError, PeftConfig
from peftkit.methods.ia3 import IA3Adapter
from peftkit.targeting import TargetError, default_target_names

LORA = peft_constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
IA3 = peft_constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
IA3_FF = peft_constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
TABLES = {"lora": LORA, "ia3": IA3, "ia3_feedforward": IA3_FF}
# the other methods both libraries have, whose defaults PEFT keeps in tables of their own
OTHER_TABLES = {m: getattr(peft_constants, f"TRANSFORMERS_MODELS_TO_{t}_TARGET_MODULES_MAPPING")
                for m, t in (("vera", "VERA"), ("loha", "LOHA"), ("lokr", "LOKR"), ("oft", "OFT"),
                             ("boft", "BOFT"), ("adalora", "ADALORA"), ("fourierft", "FOURIERFT"))}


def selected(targets: list[str] | str, paths: list[str]) -> set[str]:
    """PEFT's matching: a regex full-matches a path, a name is the path or a dotted suffix of it."""
    if isinstance(targets, str):
        return {p for p in paths if re.fullmatch(targets, p)}
    return {p for p in paths if any(p == t or p.endswith("." + t) for t in targets)}


def kit_defaults(table: str, model_type: str, paths: list[str] | None = None) -> list[str] | str:
    roles = IA3Adapter.feedforward_roles if table == "ia3_feedforward" else table
    return default_target_names(model_type, roles, paths)


# -- (a) every model type of PEFT's tables ---------------------------------------------------------------

# Names that differ from PEFT's but select the same modules, checked on the architecture's module paths
# (one block). BTLM (remote code): PEFT's "c_proj" is the attention and the FFN output; BLOOM: PEFT's (IA)3
# table writes "mlp.dense_4h_to_h" where GPT-NeoX and Falcon, which share BLOOM's names, write "dense_4h_to_h".
SAME_MODULES = {
    "btlm": [f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_fc2", "mlp.c_proj")],
    "bloom": [f"h.0.{n}" for n in ("self_attention.query_key_value", "self_attention.dense",
                                   "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")],
}


@pytest.mark.parametrize("table, model_type", [(t, m) for t, mapping in TABLES.items() for m in mapping])
def test_every_peft_model_type_has_peft_default(table, model_type):
    ref = TABLES[table][model_type]
    ours = kit_defaults(table, model_type)  # TargetError if the role table does not know the model type
    assert ours or not ref, f"{model_type}: no {table} default"
    if isinstance(ref, str) or isinstance(ours, str):
        assert ours == ref
    elif sorted(ours) != sorted(ref):
        assert model_type in SAME_MODULES, f"{model_type} {table}: peftkit {ours}, PEFT {ref}"
        paths = SAME_MODULES[model_type]
        assert selected(ours, paths) == selected(ref, paths) != set()


@pytest.mark.parametrize("method", sorted(OTHER_TABLES))
def test_other_methods_defaults_match_their_peft_tables(method):
    wrong = []
    for model_type, ref in OTHER_TABLES[method].items():
        ours = default_target_names(model_type, method)
        if isinstance(ref, str) or isinstance(ours, str):
            same = ours == ref
        elif model_type in SAME_MODULES:
            same = selected(ours, SAME_MODULES[model_type]) == selected(ref, SAME_MODULES[model_type])
        else:
            same = sorted(ours) == sorted(ref)
        if not same:
            wrong.append((model_type, ours, ref))
    assert not wrong, f"{method}: (model type, peftkit, PEFT): {wrong}"


def test_ia3_feedforward_defaults_are_targets():
    for model_type in IA3:
        assert set(kit_defaults("ia3_feedforward", model_type)) <= set(kit_defaults("ia3", model_type)), model_type


def test_unknown_model_type_raises():
    with pytest.raises(TargetError, match="no_such_model"):
        default_target_names("no_such_model", "lora")


def test_spellings_resolve_to_the_present_one():
    # BLIP-2's language model is OPT (q_proj) or T5 (q): one spelling per role on a given model
    assert default_target_names("blip-2", "lora") == ["q_proj", "q", "v_proj", "v"]
    t5_paths = ["language_model.encoder.block.0.layer.0.SelfAttention." + n for n in ("q", "k", "v", "o")]
    assert default_target_names("blip-2", "lora", t5_paths) == ["q", "v"]


# -- (b) real architectures: the same modules as PEFT ------------------------------------------------------

_DEC = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=32)
_ENC = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=32)
_OPT = dict(vocab_size=64, hidden_size=16, ffn_dim=24, num_hidden_layers=1, num_attention_heads=2,
            word_embed_proj_dim=16, max_position_embeddings=32)
_T5 = dict(vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2)
_GPT = dict(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)
_BLIP2 = dict(
    vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                       image_size=16, patch_size=8),
    qformer_config=dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                        num_attention_heads=2, encoder_hidden_size=16, max_position_embeddings=32),
    num_query_tokens=2)

# name -> (model type, tiny config kwargs)
ARCHS: dict[str, tuple[str, dict]] = {
    **{t: (t, _DEC) for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "stablelm",
                              "phi")},
    "mixtral": ("mixtral", {**_DEC, "num_local_experts": 2}),
    "gpt_neox": ("gpt_neox", {k: v for k, v in _DEC.items() if k not in ("num_key_value_heads", "head_dim")}),
    "falcon": ("falcon", dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)),
    "bloom": ("bloom", dict(vocab_size=64, hidden_size=16, n_layer=1, n_head=2)),
    "opt": ("opt", _OPT),
    "bart": ("bart", dict(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
                          max_position_embeddings=32)),
    "gpt2": ("gpt2", _GPT),
    "gpt_bigcode": ("gpt_bigcode", _GPT),
    "gptj": ("gptj", {**_GPT, "rotary_dim": 4}),
    "codegen": ("codegen", {**_GPT, "n_ctx": 32, "rotary_dim": 4}),
    "gpt_neo": ("gpt_neo", dict(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                                attention_types=[[["global"], 1]], max_position_embeddings=32)),
    **{t: (t, _ENC) for t in ("bert", "roberta", "xlm-roberta", "electra", "layoutlm", "deberta", "deberta-v2")},
    "t5": ("t5", _T5),
    "mt5": ("mt5", _T5),
    "mpt": ("mpt", dict(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=32, expansion_ratio=2)),
    "rwkv": ("rwkv", dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, attention_hidden_size=16,
                          intermediate_size=24, context_length=32)),
    "nemotron_h": ("nemotron_h", dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=8, mamba_num_heads=2, mamba_head_dim=8,
                                      ssm_state_size=8, n_groups=1, layers_block_type=["mamba", "attention", "mlp"])),
    "blip-2-opt": ("blip-2", {**_BLIP2, "text_config": {"model_type": "opt", **_OPT}}),
    "blip-2-t5": ("blip-2", {**_BLIP2, "text_config": {"model_type": "t5", **_T5}}),
    "llama4": ("llama4", dict(
        text_config={**_DEC, "intermediate_size_mlp": 24, "num_local_experts": 2},
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8, vision_output_dim=16, projector_input_dim=16,
                           projector_output_dim=16))),
    # multimodal: PEFT's default is a regex restricted to the language model (the towers use the same names)
    "gemma4": ("gemma4", dict(
        text_config={**_DEC, "num_hidden_layers": 2, "global_head_dim": 8, "vocab_size_per_layer_input": 64,
                     "hidden_size_per_layer_input": 8, "layer_types": ["sliding_attention", "full_attention"]},
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=8),
        audio_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2))),
}
REQUIRED = ("qwen3", "gemma2", "gemma3_text", "gpt_neox", "opt", "falcon", "bloom", "bart", "llama", "gpt2", "bert",
            "t5")


def build(name: str) -> torch.nn.Module:
    model_type, kwargs = ARCHS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModel.from_config(AutoConfig.for_model(model_type, **kwargs)).eval()


def test_required_architectures_are_covered():
    assert set(REQUIRED) <= set(ARCHS)
    assert {ARCHS[n][0] for n in ARCHS} >= set(REQUIRED)


# PEFT 0.21.2 on transformers 5 rewrites a Mixtral LoRA config for the fused experts before it fills in the
# default targets, leaving an empty target set: ``peft.LoraConfig()`` raises on Mixtral. Checked against its table.
PEFT_FAILS = {"mixtral"}


@pytest.mark.parametrize("name", [n for n in ARCHS if ARCHS[n][0] in LORA and n not in PEFT_FAILS])
def test_lora_default_targets_match_peft(name):
    model = build(name)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig())
    ours = peftkit.get_peft_model(model, peftkit.LoraConfig())
    ref = {n for n, m in theirs.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    mine = {p for p, _ in ours.base_model.adapter_layers()}
    assert mine == ref and mine


def test_lora_default_targets_on_mixtral_are_peft_table_names():
    ours = peftkit.get_peft_model(build("mixtral"), peftkit.LoraConfig())
    assert {p for p, _ in ours.base_model.adapter_layers()} == {f"layers.0.self_attn.{n}" for n in LORA["mixtral"]}


@pytest.mark.parametrize("name", [n for n in ARCHS if ARCHS[n][0] in IA3])
def test_ia3_default_targets_and_feedforward_match_peft(name):
    model = build(name)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config())
    ours = peftkit.get_peft_model(model, peftkit.IA3Config())
    ref = {n: m.is_feedforward for n, m in theirs.base_model.model.named_modules()
           if isinstance(m, peft.tuners.ia3.IA3Layer)}
    mine = {p: layer.adapters["default"].feedforward for p, layer in ours.base_model.adapter_layers()}
    assert mine == ref and mine


# -- (c) target_parameters: [] (written by PEFT) ---------------------------------------------------------

def test_empty_target_parameters_loads(tmp_path):
    data = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
            "target_parameters": []}
    assert PeftConfig.from_dict(data).target_parameters == []
    assert peftkit.LoraConfig.from_dict(data).target_parameters == []
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    cfg = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, peftkit.LoraConfig) and cfg.r == 4


@pytest.mark.parametrize("value", ["mlp.experts.down_proj", [3]])
def test_target_parameters_not_a_list_of_names_rejected(value):
    # a list of names is LoRA on those parameters (tests/methods/test_lora_target_parameters.py); a string is
    # refused, as peft does
    with pytest.raises(ConfigError, match="target_parameters"):
        peftkit.LoraConfig(target_parameters=value)
    with pytest.raises(ConfigError, match="target_parameters"):
        PeftConfig.from_dict({"peft_type": "LORA", "target_parameters": value})
    names = ["mlp.experts.down_proj"]
    assert peftkit.LoraConfig(target_parameters=names).target_parameters == names


def test_peft_saved_lora_with_empty_target_parameters_loads(tmp_path):
    # on transformers 5 PEFT rewrites a Mixtral config for the fused experts and saves "target_parameters": []
    theirs = peft.get_peft_model(build("mixtral"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_()
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_parameters"] == []
    ours = peftkit.PeftModel.from_pretrained(build("mixtral"), tmp_path)
    assert ours.peft_config["default"].target_parameters == []
    assert {p.rsplit(".", 1)[-1] for p, _ in ours.base_model.adapter_layers()} == {"q_proj", "v_proj"}
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        expected = theirs(input_ids=ids).last_hidden_state
        torch.testing.assert_close(ours(input_ids=ids).last_hidden_state, expected)
        assert not torch.allclose(build("mixtral")(input_ids=ids).last_hidden_state, expected)
