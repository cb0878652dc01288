"""AdapterDrop: the lowest n layers without adapters (specialised and robust), outputs equal to a bottleneck
adapter on the kept layers only, dropped layers skipping the computation, the robust training draw, files, bad input."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit import AdapterLayer, PfeifferConfig, tiny_models
from peftkit.config import ConfigError
from peftkit.methods.adapterdrop import AdapterDropAdapter, AdapterDropConfig
from peftkit.targeting import TargetError

L = 4  # layers of the test BERT
M = {"reduction_factor": 4.0}  # m = 8 on the 32-wide BERT (a 2-wide ReLU bottleneck may be dead on every token)


def _pfeiffer_on(layers):
    """The reference: a Pfeiffer adapter on the FFN outputs of ``layers`` only (no adapter elsewhere)."""
    targets = [f"bert.encoder.layer.{i}.output.dense" for i in layers]
    return peftkit.get_peft_model(_bert(), PfeifferConfig(target_modules=targets, task_type="SEQ_CLS", **M))


def _bert():
    torch.manual_seed(0)
    return tiny_models.bert(num_hidden_layers=L).eval()


def _ids():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _nudge(model):
    g = torch.Generator().manual_seed(2)
    for n, p in model.named_parameters():
        if ".adapters." in n:
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def _index(path):
    return int(path.split(".layer.")[1].split(".")[0])


def test_config_defaults_and_bad_values():
    c = AdapterDropConfig()
    assert (c.drop_layers, c.stochastic, c.max_drop_layers, c.positions, c.reduction_factor) == (
        5, False, None, ["ffn_output"], 16.0)
    for bad, field in [({"drop_layers": -1}, "drop_layers"), ({"drop_layers": 1.5}, "drop_layers"),
                       ({"stochastic": "yes"}, "stochastic"), ({"max_drop_layers": -2}, "max_drop_layers"),
                       ({"mode": "both"}, "mode")]:
        with pytest.raises(ConfigError, match=field):
            AdapterDropConfig(**bad)


def test_specialised_has_no_adapter_below_n_and_equals_pfeiffer_on_the_rest(tmp_path):
    model = peftkit.get_peft_model(_bert(), AdapterDropConfig(drop_layers=2, task_type="SEQ_CLS", **M))
    paths = [p for p, _ in model.base_model.adapter_layers()]
    assert paths == [f"bert.encoder.layer.{i}.output.dense" for i in (2, 3)]
    _nudge(model)
    with torch.no_grad():
        got = model(input_ids=_ids()).logits
    model.save_pretrained(tmp_path)
    # the file is a Pfeiffer adapter's on layers 2 and 3: it loads into one, with the same outputs
    state = load_file(tmp_path / "adapter_model.safetensors")
    ref = _pfeiffer_on([2, 3])
    ref_keys = set(peftkit.get_peft_model_state_dict(ref))
    assert set(state) == ref_keys
    peftkit.set_peft_model_state_dict(ref, state)
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=_ids()).logits, got, atol=1e-6, rtol=0)
    loaded = peftkit.PeftModel.from_pretrained(_bert(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=_ids()).logits, got, atol=0, rtol=0)


def test_robust_inference_skips_dropped_layers_and_equals_the_model_without_them(monkeypatch):
    model = peftkit.get_peft_model(_bert(), AdapterDropConfig(drop_layers=2, stochastic=True, task_type="SEQ_CLS", **M))
    layers = dict(model.base_model.adapter_layers())
    assert len(layers) == L
    _nudge(model)
    ran = []
    original = AdapterDropAdapter.bottleneck
    monkeypatch.setattr(AdapterDropAdapter, "bottleneck", lambda self, h: (ran.append(self.layer_index),
                                                                            original(self, h))[1])
    with torch.no_grad():
        got = model(input_ids=_ids()).logits
    assert ran == [2, 3]  # the dropped layers never compute their adapter
    # the same adapters on layers 2, 3 only (a Pfeiffer model), and the base on 0, 1
    ref = _pfeiffer_on([2, 3])
    with torch.no_grad():
        for path, layer in ref.base_model.adapter_layers():
            for name, p in layer.adapters["default"].named_parameters():
                p.copy_(getattr(layers[path].adapters["default"], name))
        for n, p in ref.named_parameters():  # the task head (trained in full, saved with the adapter)
            if "modules_to_save" in n:
                p.copy_(dict(model.named_parameters())[n])
        torch.testing.assert_close(ref(input_ids=_ids()).logits, got, atol=1e-6, rtol=0)
        # drop_layers may change on the loaded model: none dropped runs every adapter
        model.peft_config["default"].drop_layers = 0
        ran.clear()
        everything = model(input_ids=_ids()).logits
    assert ran == [0, 1, 2, 3] and not torch.allclose(everything, got)


def test_robust_training_draws_one_n_per_forward():
    model = peftkit.get_peft_model(_bert(), AdapterDropConfig(drop_layers=2, stochastic=True, task_type="SEQ_CLS", **M))
    _nudge(model)
    model.train()
    state = next(iter(model.base_model.adapters("default")))[1].state
    assert state.highest == L - 1  # the paper's {0, ..., L - 1}
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        model.zero_grad()
        model(input_ids=_ids()).logits.pow(2).mean().backward()
        n = state.n
        seen.add(n)
        for path, adapter in model.base_model.adapters("default"):
            grad = adapter.up_weight.grad
            if _index(path) < n:  # dropped in this forward: no gradient
                assert grad is None or not grad.any(), (path, n)
            else:
                assert grad is not None and grad.abs().sum() > 0, (path, n)
    assert seen == set(range(L))


def test_dropping_every_layer_and_unindexed_targets_raise_and_leave_the_model_untouched():
    model = _bert()
    with pytest.raises(TargetError, match="drop_layers"):
        peftkit.get_peft_model(model, AdapterDropConfig(drop_layers=L))
    with pytest.raises(Exception, match="layer index"):
        peftkit.get_peft_model(model, AdapterDropConfig(target_modules=["pooler.dense"], drop_layers=1))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_houlsby_positions_and_parameter_count():
    # Houlsby's placement (two adapters per layer, m = 64 -> 8 here), layers 1..3 kept
    model = peftkit.get_peft_model(_bert(), AdapterDropConfig(positions=["attention_output", "ffn_output"],
                                                              bottleneck_size=8, drop_layers=1))
    paths = [p for p, _ in model.base_model.adapter_layers()]
    assert len(paths) == 2 * (L - 1) and min(_index(p) for p in paths) == 1
    d, m = 32, 8
    assert model.get_nb_trainable_parameters()[0] == 2 * (L - 1) * (m * (d + 1) + d * (m + 1))
