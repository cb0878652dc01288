"""BitFit: exact bias counts on RoBERTa-base, only biases change, exact disable / save / load, clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit import BitFitConfig, PeftConfig, PeftModel, SelectionError, get_peft_model, selection_summary
from peftkit.targeting import NotApplicableError

from peftkit import tiny_models

from ..families import FAMILY


@pytest.fixture(scope="module")
def roberta_base():
    """RoBERTa-base from its default config (125M parameters, random weights): built once."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    return RobertaForSequenceClassification(RobertaConfig(num_labels=2)).eval()


def test_roberta_base_trains_exactly_the_biases_plus_the_head(roberta_base):
    biases = {n: p.numel() for n, p in roberta_base.named_parameters()
              if n.endswith(".bias") and not n.startswith("classifier.")}
    head = sum(p.numel() for p in roberta_base.classifier.parameters())
    # 12 layers x (q, k, v, attn out, attn LN, FFN in 3072, FFN out, out LN) + the embedding LayerNorm
    assert sum(biases.values()) == 12 * (7 * 768 + 3072) + 768 == 102_144
    assert head == 768 * 768 + 768 + 768 * 2 + 2
    model = get_peft_model(roberta_base, BitFitConfig(task_type="SEQ_CLS"))
    try:
        assert selection_summary(model) == {"selected": 102_144, "modules_to_save": head}
        assert model.get_nb_trainable_parameters()[0] == 102_144 + head
        recorded = model.peft_config["default"].selected_params
        assert {k: v["nnz"] for k, v in recorded.items()} == {k: n for k, n in biases.items()}
        assert all(v["format"] == "full" for v in recorded.values())
    finally:
        model.unload()


def test_roberta_base_subset_query_and_intermediate(roberta_base):
    model = get_peft_model(roberta_base, BitFitConfig(task_type="SEQ_CLS", target_modules=["query", "intermediate.dense"]))
    try:
        assert selection_summary(model)["selected"] == 12 * (768 + 3072)
    finally:
        model.unload()
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in roberta_base.modules())


def _train(model, family, steps=3):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        family.run(model).pow(2).mean().backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit", "convnet"])
def test_training_changes_only_biases_and_disable_restores_exactly(name, tmp_path):
    family = FAMILY[name]
    kw = {"target_modules": family.targets} if family.targets else {}
    model = get_peft_model(family.model(), BitFitConfig(task_type=family.task_type, **kw))
    base_state = {k: v.clone() for k, v in family.model().state_dict().items()}
    base_out = family.run(family.model())
    _train(model, family)
    tuned = family.run(model)
    assert (tuned - base_out).abs().max() > 1e-4
    for _ in range(2):  # disable and re-enable, twice: bit-exact both ways
        with model.disable_adapter():
            assert torch.equal(family.run(model), base_out)
        assert torch.equal(family.run(model), tuned)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.endswith(".bias.delta") or ".modules_to_save." in k or "classifier" in k for k in saved)
    loaded = PeftModel.from_pretrained(family.model(), tmp_path)
    assert torch.equal(family.run(loaded), tuned)
    plain = model.merge_and_unload()
    changed = {k for k, v in plain.state_dict().items() if not torch.equal(v, base_state[k])}
    head = ("classifier.",) if family.task_type else ()
    assert changed and all(k.endswith(".bias") or k.startswith(head) for k in changed), changed
    torch.testing.assert_close(family.run(plain), tuned, atol=1e-6, rtol=0)


def test_base_weights_are_never_written_while_training():
    family = FAMILY["bert"]
    model = get_peft_model(family.model(), BitFitConfig(task_type="SEQ_CLS"))
    before = {n: p.clone() for n, p in model.get_base_model().named_parameters() if ".adapters." not in n}
    _train(model, family)
    after = dict(model.get_base_model().named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if ".modules_to_save." not in n)


def test_configured_from_a_dict():
    family = FAMILY["bert"]
    config = PeftConfig.from_dict({"peft_type": "BITFIT", "task_type": "SEQ_CLS", "target_modules": ["query"]})
    model = get_peft_model(family.model(), config)
    assert selection_summary(model)["selected"] == 2 * 32


def test_bias_free_model_is_not_applicable():
    with pytest.raises(NotApplicableError, match="BitFit: LlamaForCausalLM has no bias"):
        get_peft_model(FAMILY["llama"].model(), BitFitConfig())


def test_loading_onto_a_model_with_other_shapes_fails_clearly(tmp_path):
    family = FAMILY["bert"]
    get_peft_model(family.model(), BitFitConfig(task_type="SEQ_CLS")).save_pretrained(tmp_path)
    other = tiny_models.bert(hidden_size=48)  # the bert family, wider
    flags = {n: p.requires_grad for n, p in other.named_parameters()}
    with pytest.raises(SelectionError, match=r"'bert.embeddings.LayerNorm.bias' has shape \(48,\) in this model "
                                             r"but \(32,\) in the adapter"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in other.modules())
    assert flags == {n: p.requires_grad for n, p in other.named_parameters()}
