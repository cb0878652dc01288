"""LST (ladder side-tuning): config checks, the ladder formula by hand, a graph-free backbone, gradients, files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import peftkit
from peftkit import LoraConfig, LSTConfig, PeftModel
from peftkit.config import ConfigError
from peftkit.methods.lst import LSTLayer
from peftkit.methods.lst import functional as LF
from peftkit.methods.lst.wrapper import record_block
from peftkit.targeting import NotApplicableError

from ..families import FAMILY, nudge_trainable

BERT = FAMILY["bert"]
D, N = 32, 2  # tiny BERT: hidden size, blocks (4 heads, FFN 37, 3 labels)


def _ids():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 99, (2, 6), generator=g), torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def _lst(**kwargs):
    model = peftkit.get_peft_model(BERT.model(), LSTConfig(task_type="SEQ_CLS", **kwargs))
    torch.manual_seed(3)
    nudge_trainable(model, 0.3)
    return model.eval()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"reduction_factor": 0}, "reduction_factor"), ({"reduction_factor": 2.0}, "reduction_factor"),
    ({"gate_temperature": 0}, "gate_temperature"), ({"gate_init": "0"}, "gate_init"),
    ({"init_weights": 1}, "init_weights"), ({"side_num_attention_heads": 0}, "side_num_attention_heads"),
    ({"side_intermediate_size": 1.5}, "side_intermediate_size"), ({"target_modules": [1]}, "target_modules"),
])
def test_bad_values_raise_config_error(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        LSTConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "field"), [({"reduction_factor": 5}, "reduction_factor"),
                                               ({"reduction_factor": 4, "side_num_attention_heads": 3},
                                                "side_num_attention_heads"),
                                               ({"target_modules": ["nothing"]}, "target_modules")])
def test_shapes_the_side_network_cannot_take_fail_at_injection(kwargs, field):
    model = BERT.model()
    with pytest.raises(ValueError, match=f"{field}.*bert.encoder"):
        peftkit.get_peft_model(model, LSTConfig(task_type="SEQ_CLS", **kwargs))
    assert not any(isinstance(m, LSTLayer) for m in model.modules())


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "convnet", "clip"])
def test_models_without_a_bert_style_encoder_are_not_applicable(family):
    with pytest.raises(NotApplicableError, match="LST"):
        peftkit.get_peft_model(FAMILY[family].model(), LSTConfig())


def test_gates_and_ladder():
    mu = LF.gates(torch.tensor([0.0, 0.1, -0.2]), 0.1)
    torch.testing.assert_close(mu, 1 / (1 + torch.exp(-torch.tensor([0.0, 1.0, -2.0]))))
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    torch.testing.assert_close(LF.ladder(a, b, mu[1]), mu[1] * a + (1 - mu[1]) * b)


def test_forward_equals_the_ladder_formula_by_hand():
    model = _lst(reduction_factor=4, gate_temperature=0.5)
    ids, mask = _ids()
    logits = model(input_ids=ids, attention_mask=mask).logits
    plain = BERT.model()
    seen = {}
    plain.bert.encoder.register_forward_pre_hook(lambda m, a, k: seen.update(mask=a[1] if len(a) > 1 else
                                                                            k.get("attention_mask")), with_kwargs=True)
    with torch.no_grad():
        hs = plain.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        side = model.base_model.model.bert.encoder.adapters["default"]
        assert len(hs) == N + 1 and side.side_gates.shape == (N,)
        mu = torch.sigmoid(side.side_gates / 0.5)
        downs = [(m.weight, m.bias) for m in side.side_downsamples]
        s = F.linear(hs[0], *downs[0])
        for i in range(N):
            u = mu[i] * F.linear(hs[i + 1], *downs[i + 1]) + (1 - mu[i]) * s
            s = side.side_blocks[i](u, seen["mask"])
        y = hs[N] + s @ side.side_upsample.weight.T + side.side_upsample.bias
        head = model.base_model.model.classifier.modules_to_save["default"]
        expected = head(plain.bert.pooler(y))
    assert s.shape == (2, 6, D // 4)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, plain(input_ids=ids, attention_mask=mask).logits, atol=1e-3)


def _saved_inside_encoder(model, encoder):
    """Tensors autograd saves while ``encoder`` (the frozen backbone) runs, and outside it, in one training step."""
    inside, outside, depth = [], [], [0]
    encoder.register_forward_pre_hook(lambda *a: depth.__setitem__(0, depth[0] + 1))
    encoder.register_forward_hook(lambda *a: depth.__setitem__(0, depth[0] - 1))

    def pack(t):
        (inside if depth[0] else outside).append(t)
        return t

    ids, mask = _ids()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, attention_mask=mask).logits.pow(2).mean()
    loss.backward()
    return inside, outside


def test_backbone_keeps_no_activations_and_builds_no_graph():
    model = _lst(reduction_factor=4).train()
    outputs = []
    for block in model.base_model.model.bert.encoder.base_layer.layer:
        block.register_forward_hook(lambda m, a, o: outputs.append(o))
    inside, outside = _saved_inside_encoder(model, model.base_model.model.bert.encoder.base_layer)
    assert inside == [] and len(outside) > 0
    assert len(outputs) == N and not any(o.requires_grad for o in outputs)
    # the probe catches a backbone that does keep activations: LoRA on q / v saves its inputs inside the encoder
    lora = peftkit.get_peft_model(BERT.model(), LoraConfig(task_type="SEQ_CLS", r=8, target_modules=["query", "value"]))
    inside, _ = _saved_inside_encoder(lora.train(), lora.base_model.model.bert.encoder)
    assert len(inside) > 0


def test_only_side_parameters_and_the_head_get_gradients():
    model = _lst(reduction_factor=4).train()
    ids, mask = _ids()
    model(input_ids=ids, attention_mask=mask).logits.pow(2).mean().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == trainable
    assert all(".adapters.default.side_" in n or ".modules_to_save.default." in n for n in trainable)
    assert {n.split(".side_")[1].split(".")[0] for n in trainable if ".side_" in n} == {
        "downsamples", "gates", "blocks", "upsample"}


def test_starts_at_base_and_counts_its_parameters():
    ids, mask = _ids()
    torch.manual_seed(0)
    model = peftkit.get_peft_model(BERT.model(), LSTConfig(task_type="SEQ_CLS", reduction_factor=4)).eval()
    with torch.no_grad():
        base = BERT.model()(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, base, atol=1e-6, rtol=1e-6)
    # d = 32, d_s = 8, 4 heads (gcd(4, 8)), FFN 37 // 4 = 9, N = 2 blocks, classifier 32 x 3 + 3
    ds, f = 8, 9
    block = 4 * (ds * ds + ds) + (ds * f + f) + (f * ds + ds) + 2 * 2 * ds
    assert model.get_nb_trainable_parameters()[0] == 3 * (D * ds + ds) + N + N * block + (ds * D + D) + (D * 3 + 3)
    off = peftkit.get_peft_model(BERT.model(), LSTConfig(task_type="SEQ_CLS", reduction_factor=4, init_weights=False))
    with torch.no_grad():
        assert not torch.allclose(off(input_ids=ids, attention_mask=mask).logits, base, atol=1e-4)


def test_save_load_round_trip_file_keys_and_unload(tmp_path):
    model = _lst(reduction_factor=4)
    ids, mask = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    prefix = "base_model.model.bert.encoder."
    assert {f"{prefix}side_downsamples.{i}.{p}" for i in range(N + 1) for p in ("weight", "bias")} <= keys
    assert {f"{prefix}side_gates", f"{prefix}side_upsample.weight", f"{prefix}side_blocks.1.output.dense.weight",
            "base_model.model.classifier.weight"} <= keys
    assert len(keys) == 2 * (N + 1) + 1 + N * 16 + 2 + 2
    loaded = PeftModel.from_pretrained(BERT.model(), tmp_path).eval()
    assert loaded.peft_config["default"].reduction_factor == 4
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected, atol=0, rtol=0)
        plain = loaded.unload()  # the encoder as it was, with the trained classifier (as peft)
        assert not any(record_block in m._forward_hooks.values() for m in plain.modules())
        assert not any(isinstance(m, LSTLayer) for m in plain.modules())
        ref = BERT.model()
        ref.classifier.load_state_dict(plain.classifier.state_dict())
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).logits,
                                   ref(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)


def test_merge_is_refused_and_roberta_works():
    model = _lst(reduction_factor=4)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_adapter()
    rob = peftkit.get_peft_model(FAMILY["roberta"].model(), LSTConfig(task_type="SEQ_CLS", reduction_factor=2))
    assert rob.peft_config["default"].target_modules == {"roberta.encoder"}
    assert isinstance(rob.base_model.model.roberta.encoder, LSTLayer)
