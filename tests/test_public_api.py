"""peft's public names in peftkit: every name of ``peft.__all__`` exists or is documented as absent, and the
names peftkit provides behave as peft's (AutoPeftModel round trips, PeftType, get_peft_config, LoftQConfig,
the state-dict, status and small helpers), checked against the installed peft on tiny models."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings

import pytest
import torch

import peftkit
from peftkit import tiny_models

peft = pytest.importorskip("peft")
if getattr(peft, "__file__", "") and "peftkit" in peft.__file__:  # peftkit serving `import peft`
    pytest.skip("the real peft package is needed as the reference", allow_module_level=True)

DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "compatibility.md")
SECTION = "## peft's public names"
V = 64


# -- (a) every name of peft.__all__ -----------------------------------------------------------------------
def documented_absent() -> set[str]:
    """Names in the first cell of the table rows of the doc section."""
    with open(DOC, encoding="utf-8") as fh:
        text = fh.read()
    assert SECTION in text, f"docs/compatibility.md lacks the section {SECTION!r}"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in body.splitlines():
        if not line.startswith("|") or set(line) <= set("|- "):
            continue
        first = line.split("|")[1]
        names.update(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", first))
    return names - {"names"}


def test_every_peft_name_exists_or_is_documented() -> None:
    absent = documented_absent()
    missing = [n for n in peft.__all__ if not hasattr(peftkit, n) and n not in absent]
    assert not missing, f"peft names neither in peftkit nor in docs/compatibility.md ({SECTION}): {missing}"
    # the list stays honest: only peft names, and none that peftkit has by now
    assert not absent - set(peft.__all__), f"documented names that peft does not export: {absent - set(peft.__all__)}"
    assert not {n for n in absent if hasattr(peftkit, n)}, "documented as absent but present in peftkit"
    not_exported = [n for n in peft.__all__ if hasattr(peftkit, n) and n not in peftkit.__all__]
    assert not not_exported, f"missing from peftkit.__all__: {not_exported}"


# -- tiny models ----------------------------------------------------------------------------------------------
def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_models.llama(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=32).eval()


def tiny_bert(head: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_models.bert(head, vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=32).eval()


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every trainable tensor (adapter weights, trained head copies) off its initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(3))


def out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        res = model(input_ids=ids())
    return res.logits if hasattr(res, "logits") else res.last_hidden_state


@pytest.fixture
def llama_base(tmp_path) -> tuple[torch.nn.Module, str]:
    model = tiny_llama()
    folder = str(tmp_path / "base")
    model.save_pretrained(folder)
    return model, folder


def save_peftkit_adapter(model: torch.nn.Module, base_folder: str, folder: str, config: peftkit.PeftConfig):
    config.base_model_name_or_path = base_folder
    pm = peftkit.get_peft_model(model, config)
    perturb(pm)
    pm.save_pretrained(folder)
    return pm.eval()


# -- (b) AutoPeftModel round trips -----------------------------------------------------------------------------
def test_auto_causal_lm_round_trip(llama_base, tmp_path) -> None:
    model, base_folder = llama_base
    folder = str(tmp_path / "adapter")
    pm = save_peftkit_adapter(model, base_folder, folder,
                              peftkit.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    loaded = peftkit.AutoPeftModelForCausalLM.from_pretrained(folder)
    assert type(loaded) is peftkit.PeftModelForCausalLM
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(out(loaded), out(pm), atol=1e-6, rtol=0)
    # peft's own AutoPeftModel reads the same folder to the same outputs
    ref = peft.AutoPeftModelForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(out(ref), out(pm), atol=1e-6, rtol=0)
    # keyword arguments reach the base model's from_pretrained; is_trainable reaches the adapter
    trainable = peftkit.AutoPeftModelForCausalLM.from_pretrained(folder, is_trainable=True, dtype=torch.float64)
    assert trainable.get_base_model().model.embed_tokens.weight.dtype == torch.float64
    assert any(p.requires_grad for p in trainable.parameters())


def test_auto_sequence_classification_round_trip(tmp_path) -> None:
    model = tiny_bert()
    base_folder, folder = str(tmp_path / "base"), str(tmp_path / "adapter")
    model.save_pretrained(base_folder)
    pm = save_peftkit_adapter(model, base_folder, folder, peftkit.LoraConfig(task_type="SEQ_CLS", r=4))
    loaded = peftkit.AutoPeftModelForSequenceClassification.from_pretrained(folder)
    assert type(loaded) is peftkit.PeftModelForSequenceClassification
    torch.testing.assert_close(out(loaded), out(pm), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="Expected target PEFT class: PeftModelForSequenceClassification"):
        peftkit.AutoPeftModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="Cannot use `AutoPeftModel` with a task type"):
        peftkit.AutoPeftModel.from_pretrained(folder)


def test_auto_loads_a_folder_saved_by_peft(llama_base, tmp_path) -> None:
    model, base_folder = llama_base
    folder = str(tmp_path / "adapter")
    ref = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    ref.peft_config["default"].base_model_name_or_path = base_folder
    perturb(ref)
    ref.save_pretrained(folder)
    loaded = peftkit.AutoPeftModelForCausalLM.from_pretrained(folder)
    assert type(loaded) is peftkit.PeftModelForCausalLM
    torch.testing.assert_close(out(loaded), out(ref.eval()), atol=1e-6, rtol=0)


def test_auto_peft_model_uses_peft_auto_mapping(tmp_path) -> None:
    """An adapter without a task type: peft records the base class in ``auto_mapping``; AutoPeftModel uses it."""
    model = tiny_bert(head=False)
    base_folder, folder = str(tmp_path / "base"), str(tmp_path / "adapter")
    model.save_pretrained(base_folder)
    ref = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["query", "value"]))
    ref.peft_config["default"].base_model_name_or_path = base_folder
    perturb(ref)
    ref.save_pretrained(folder)
    loaded = peftkit.AutoPeftModel.from_pretrained(folder)
    assert type(loaded) is peftkit.PeftModel
    assert type(loaded.get_base_model()).__name__ == "BertModel"
    torch.testing.assert_close(out(loaded), out(ref.eval()), atol=1e-6, rtol=0)
    # the import allowlist guards the module named in the file
    cfg_file = os.path.join(folder, "adapter_config.json")
    with open(cfg_file) as fh:
        data = json.load(fh)
    data["auto_mapping"]["parent_library"] = "os"
    with open(cfg_file, "w") as fh:
        json.dump(data, fh)
    with pytest.raises(ValueError, match="not in the import allowlist"):
        peftkit.AutoPeftModel.from_pretrained(folder)


def write_tokenizer(folder: str, size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(folder)


@pytest.mark.parametrize("size", [V + 6, V - 4])
def test_auto_resizes_embeddings_for_a_larger_tokenizer(llama_base, tmp_path, size) -> None:
    model, base_folder = llama_base
    folder = str(tmp_path / "adapter")
    save_peftkit_adapter(model, base_folder, folder,
                         peftkit.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    write_tokenizer(folder, size)
    loaded = peftkit.AutoPeftModelForCausalLM.from_pretrained(folder)
    ref = peft.AutoPeftModelForCausalLM.from_pretrained(folder)
    rows = loaded.get_base_model().get_input_embeddings().weight.shape[0]
    assert rows == max(size, V) == ref.get_base_model().get_input_embeddings().weight.shape[0]


def test_auto_refuses_non_local_base_and_direct_construction(tmp_path) -> None:
    folder = str(tmp_path / "adapter")
    peftkit.LoraConfig(task_type="CAUSAL_LM", base_model_name_or_path="org/not-a-local-folder").save_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        peftkit.AutoPeftModelForCausalLM.from_pretrained(folder)
    with pytest.raises(OSError, match="from_pretrained"):
        peftkit.AutoPeftModelForCausalLM()
    assert peftkit.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.keys() == peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.keys()
    for key, cls in peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items():
        assert peftkit.MODEL_TYPE_TO_PEFT_MODEL_MAPPING[key].__name__ == cls.__name__


# -- (c) PeftType, get_peft_config, LoftQConfig -----------------------------------------------------------
def test_peft_type_has_peft_members_in_order() -> None:
    ours = list(peftkit.PeftType)
    assert [(m.name, m.value) for m in ours[:len(peft.PeftType)]] == [(m.name, m.value) for m in peft.PeftType]
    assert issubclass(peftkit.PeftType, str)
    for spec in peftkit.list_methods():  # every peftkit config's peft_type is a member's value
        member = peftkit.PeftType(spec.peft_type)
        assert spec.config_cls(**example_kwargs(spec)).peft_type == member
        assert member in peftkit.PEFT_TYPE_TO_CONFIG_MAPPING
    assert peftkit.LoraConfig().peft_type == peftkit.PeftType.LORA == peft.PeftType.LORA
    assert peftkit.LoraConfig(peft_type=peft.PeftType.LORA).to_dict()["peft_type"] == "LORA"


# configs of methods registered without examples (they need a field)
EXTRA_KWARGS = {"composition": {"block": peftkit.Stack("a", "b")},
                "hybrid": {"parts": {"lora": {"r": 2}, "pfeiffer": {}}}}


def example_kwargs(spec: peftkit.MethodSpec) -> dict:
    return dict(spec.examples[0][1]) if spec.examples else dict(EXTRA_KWARGS.get(spec.name, {}))


def _examples() -> list[tuple[str, str, dict]]:
    return [(spec.name, spec.peft_type, example_kwargs(spec)) for spec in peftkit.list_methods()]


@pytest.mark.parametrize("name,peft_type,kwargs", _examples(), ids=[e[0] for e in _examples()])
def test_get_peft_config_builds_each_method(name, peft_type, kwargs) -> None:
    spec = peftkit.get_method(name)
    config = spec.config_cls(**kwargs)
    built = peftkit.get_peft_config(config.to_dict())
    expected = peftkit.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    assert type(built) is expected and isinstance(config, expected)
    if type(config) is expected:  # (P-tuning v2 is a prefix-tuning config: PREFIX_TUNING builds the latter)
        assert built.to_dict() == config.to_dict()
    if peft_type in peft.PeftType.__members__:  # a peft counterpart: the same class name as peft's
        assert expected.__name__ == peft.PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType(peft_type)].__name__


# peft configs that need a field to be built
PEFT_KWARGS = {"ADALORA": {"total_step": 10}, "ADAPTION_PROMPT": {"adapter_len": 4, "adapter_layers": 1},
               "CPT": {"task_type": "CAUSAL_LM"}}
SHARED_TYPES = sorted(str(t.value) for t in peftkit.PEFT_TYPE_TO_CONFIG_MAPPING if t.value in peft.PeftType.__members__)


@pytest.mark.parametrize("peft_type", SHARED_TYPES)
def test_get_peft_config_reads_peft_config_dicts(peft_type) -> None:
    """Each method both have: peft's own config dict builds peftkit's class of the same name, every key known."""
    ref = peft.PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType(peft_type)](**PEFT_KWARGS.get(peft_type, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = peftkit.get_peft_config(ref.to_dict())  # peft_type is peft's enum member here
    assert type(ours).__name__ == type(ref).__name__ and ours.peft_type == peft_type


def test_get_peft_config_reads_peft_dicts() -> None:
    ref = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"], task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of peft's LoraConfig is known
        ours = peftkit.get_peft_config(ref.to_dict())  # peft_type is peft's enum member here
    assert type(ours) is peftkit.LoraConfig and (ours.r, ours.lora_alpha, ours.target_modules) == (4, 16, {"q_proj"})
    assert ours.task_type == "CAUSAL_LM" and ours.peft_type == "LORA"
    assert type(peftkit.get_peft_config({"peft_type": "IA3", "target_modules": ["q"], "feedforward_modules": []})) \
        is peftkit.IA3Config
    with pytest.raises(KeyError, match="NO_SUCH_TYPE"):
        peftkit.get_peft_config({"peft_type": "NO_SUCH_TYPE"})


def test_loftq_config_like_peft(tmp_path) -> None:
    ours_fields = [(f.name, f.default) for f in dataclasses.fields(peftkit.LoftQConfig)]
    assert ours_fields == [(f.name, f.default) for f in dataclasses.fields(peft.LoftQConfig)]
    assert ours_fields == [("loftq_bits", 4), ("loftq_iter", 1)]
    for kw in ({}, {"loftq_bits": 8, "loftq_iter": 3}):
        ours = peftkit.LoraConfig(init_lora_weights="loftq", loftq_config=peftkit.LoftQConfig(**kw))
        as_dict = peftkit.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1, **kw})
        ref = peft.LoraConfig(init_lora_weights="loftq", loftq_config=peft.LoftQConfig(**kw))
        assert ours.loftq_config == as_dict.loftq_config == ref.loftq_config
        assert type(ours.loftq_config) is dict and ours.loftq_options == as_dict.loftq_options
        assert json.loads(json.dumps(ours.to_dict()))["loftq_config"] == ref.to_dict()["loftq_config"]
        folder = str(tmp_path / f"cfg{len(kw)}")
        ours.save_pretrained(folder)
        assert peftkit.PeftConfig.from_pretrained(folder).loftq_config == ref.loftq_config
        assert peft.PeftConfig.from_pretrained(folder).loftq_config == ref.loftq_config
    with pytest.raises(peftkit.ConfigError, match="loftq_bits"):
        peftkit.LoraConfig(init_lora_weights="loftq", loftq_config=peftkit.LoftQConfig(loftq_bits=3))


# -- state dicts, status, helpers ----------------------------------------------------------------------------
def pair(config_kwargs: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    ours = peftkit.get_peft_model(tiny_bert(), peftkit.LoraConfig(**config_kwargs))
    ref = peft.get_peft_model(tiny_bert(), peft.LoraConfig(**config_kwargs))
    return ours, ref


def test_base_model_state_dict_like_peft() -> None:
    ours, ref = pair({"task_type": "SEQ_CLS", "r": 4, "target_modules": ["query", "value"]})
    perturb(ours)
    mine, theirs = peftkit.get_base_model_state_dict(ours), peft.get_base_model_state_dict(ref)
    assert sorted(mine) == sorted(theirs) == sorted(tiny_bert().state_dict())
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], atol=0, rtol=0)
    new = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in mine.items()}
    before = peftkit.get_peft_model_state_dict(ours)
    assert peftkit.set_base_model_state_dict(ours, new) == ([], [])
    for key, value in peftkit.get_base_model_state_dict(ours).items():
        torch.testing.assert_close(value, new[key], atol=0, rtol=0)
    for key, value in peftkit.get_peft_model_state_dict(ours).items():  # adapters untouched
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        peftkit.set_base_model_state_dict(ours, {**new, "nope": torch.zeros(1)})
    res = peftkit.set_base_model_state_dict(ours, {"nope": torch.zeros(1)}, strict=False)
    assert res.unexpected_keys == ["nope"] and sorted(res.missing_keys) == sorted(new)


def test_layer_and_model_status_like_peft() -> None:
    ours, ref = pair({"task_type": "SEQ_CLS", "r": 4, "target_modules": ["query", "value"]})
    mine, theirs = peftkit.get_layer_status(ours), peft.get_layer_status(ref)
    assert [s.name for s in mine] == [s.name for s in theirs]
    for a, b in zip(mine, theirs):  # lora.Linear and ModulesToSaveWrapper: the same module_type strings too
        assert dataclasses.asdict(a) == dataclasses.asdict(b)
    ours.merge_adapter()
    ref.merge_adapter()
    ma, mb = dataclasses.asdict(peftkit.get_model_status(ours)), dataclasses.asdict(peft.get_model_status(ref))
    assert ma.pop("adapter_model_type") == "TunerModel" and mb.pop("adapter_model_type") == "LoraModel"
    assert ma == mb
    with pytest.raises(ValueError, match="No adapter layers"):
        peftkit.get_layer_status(tiny_bert())


def test_load_peft_weights_like_peft(tmp_path) -> None:
    ours, _ = pair({"r": 4, "target_modules": ["query", "value"]})
    perturb(ours)
    ours.save_pretrained(str(tmp_path))
    mapping = {r"encoder\.layer\.0": "encoder.block.0"}
    for kw in ({"device": "cpu"}, {"device": "cpu", "key_mapping": mapping}):
        mine, theirs = peftkit.load_peft_weights(str(tmp_path), **kw), peft.load_peft_weights(str(tmp_path), **kw)
        assert sorted(mine) == sorted(theirs)
        for key in mine:
            torch.testing.assert_close(mine[key], theirs[key], atol=0, rtol=0)
    with pytest.raises(FileNotFoundError):
        peftkit.load_peft_weights(str(tmp_path / "missing"))


def test_small_helpers_like_peft() -> None:
    x = torch.tensor([[5, 6, -100, 7], [1, -100, 2, 3]])
    assert torch.equal(peftkit.shift_tokens_right(x, 0, 2), peft.shift_tokens_right(x, 0, 2))
    ours, ref = pair({"r": 4, "target_modules": ["query", "value"]})
    peftkit.cast_mixed_precision_params(ours, torch.bfloat16)
    peft.cast_mixed_precision_params(ref, torch.bfloat16)
    dtypes = lambda m: sorted((str(p.dtype), p.requires_grad, p.numel()) for p in m.parameters())  # noqa: E731
    assert dtypes(ours) == dtypes(ref)
