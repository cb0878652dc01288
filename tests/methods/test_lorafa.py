"""LoRA-FA: the config, the paper's formula and gradients, the memory claim (the layer input is not kept for
backward), A frozen through training, and its files loading in Hugging Face PEFT as a plain LoRA."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.lorafa import LoraFAAdapter, LoraFAConfig
from peftkit.methods.lorafa import functional as FA

from ..families import FAMILY, untouched
from ..parity import field_defaults, perturb
from ..saved import saved_shapes

SHARED = ("r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias",
          "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern")


def test_config_fields_are_loras_with_loras_defaults(tmp_path):
    ours, theirs = field_defaults(LoraFAConfig), field_defaults(peft.LoraConfig)
    assert set(SHARED) <= set(ours) and {k: ours[k] for k in SHARED} == {k: theirs[k] for k in SHARED}
    LoraFAConfig(r=4, lora_alpha=16, target_modules=["q_proj"], use_rslora=True).save_pretrained(tmp_path)
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LoraFAConfig) and loaded.peft_type == "LORAFA"
    assert (loaded.r, loaded.lora_alpha, loaded.use_rslora, loaded.target_modules) == (4, 16, True, {"q_proj"})


@pytest.mark.parametrize("bad", [{"r": 0}, {"r": 2.0}, {"lora_alpha": 0}, {"lora_dropout": 1.0}, {"bias": "some"},
                                 {"init_lora_weights": "pissa"}, {"use_rslora": "yes"}, {"fan_in_fan_out": 1},
                                 {"layers_pattern": "layers"}])
def test_bad_config_values_name_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(ConfigError, match=f"LoraFAConfig.{field}"):
        LoraFAConfig(**bad)


def _layer(d_in=12, d_out=10, r=3, bias=True, dropout=0.0, conv1d=False, seed=0):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    base = Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out, bias=bias)
    base.requires_grad_(False)
    adapter = LoraFAAdapter(base, LoraFAConfig(r=r, lora_alpha=6, lora_dropout=dropout, init_lora_weights=False))
    adapter.requires_grad_(True)
    return base, adapter


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_output_and_gradients_are_the_papers(conv1d, fused):
    """h = W0 x + b + (alpha / r) B A x; dL/dB = s g^T (A x); dL/dx = g W0 + s (g B) A; A gets no gradient."""
    base, adapter = _layer(conv1d=conv1d)
    x = torch.randn(2, 5, 12, requires_grad=True)
    g = torch.randn(2, 5, 10)
    y = adapter.fused_forward(base, x) if fused else adapter(base, x, base(x))
    assert y is not None
    (y * g).sum().backward()
    W = base.weight.t() if conv1d else base.weight  # (d_out, d_in)
    A, B, s = adapter.lora_A.detach(), adapter.lora_B.detach(), 6 / 3
    assert adapter.scaling == s
    torch.testing.assert_close(y, x @ W.t() + base.bias + s * (x @ A.t()) @ B.t(), atol=1e-6, rtol=1e-5)
    g2, x2 = g.reshape(-1, 10), x.detach().reshape(-1, 12)
    torch.testing.assert_close(adapter.lora_B.grad, s * g2.t() @ (x2 @ A.t()), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.reshape(-1, 12), g2 @ W + s * (g2 @ B) @ A, atol=1e-5, rtol=1e-5)
    assert adapter.lora_A.grad is None and not adapter.lora_A.requires_grad


def test_dropout_applies_to_the_branch_only():
    base, adapter = _layer(dropout=0.5)
    adapter.train()
    x = torch.randn(4, 12, requires_grad=True)
    torch.manual_seed(5)
    y = adapter.fused_forward(base, x)
    torch.manual_seed(5)
    xd = nn.functional.dropout(x.detach(), 0.5, training=True)
    A, B = adapter.lora_A.detach(), adapter.lora_B.detach()
    torch.testing.assert_close(y, base(x) + 2 * (xd @ A.t()) @ B.t(), atol=1e-6, rtol=1e-5)
    y.sum().backward()
    mask = (xd != 0).float() * 2  # dropout's backward: mask / (1 - p)
    expected = torch.ones(4, 10) @ base.weight + ((2 * torch.ones(4, 10) @ B) @ A) * mask
    torch.testing.assert_close(x.grad, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_layer_keeps_only_the_projected_input(fused):
    """What backward keeps of the data: ``A x`` (n, r) only, never ``x`` (n, d_in); LoRA keeps ``x`` as well."""
    base, adapter = _layer()
    x = torch.randn(8, 12, requires_grad=True)
    run = (lambda: adapter.fused_forward(base, x)) if fused else (lambda: adapter(base, x, base(x)))
    assert saved_shapes(run, base, adapter) == [(8, 3)]
    lora = peftkit.get_peft_model(nn.Sequential(base), peftkit.LoraConfig(r=3, target_modules=["0"]))
    layer = lora.base_model.model[0]
    assert sorted(saved_shapes(lambda: layer(x), layer)) == [(8, 3), (8, 12)]  # LoRA: h and x


def test_model_saves_the_input_size_less_than_lora():
    """On BERT (query and value adapted), the saved tensors (distinct storages, parameters excluded) are LoRA's
    minus one layer input per block: q and v read the same hidden states, which only lora_A's gradient needs."""
    family = FAMILY["bert"]

    def saved_bytes(config):
        model = peftkit.get_peft_model(family.model(), config).train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            family.run(model)
        return sum(seen.values())

    lora = saved_bytes(peftkit.LoraConfig(r=4, task_type="SEQ_CLS"))
    fa = saved_bytes(LoraFAConfig(r=4, task_type="SEQ_CLS"))
    cfg = family.model().config
    x_bytes = 2 * 7 * cfg.hidden_size * 4  # family.run: 2 x 7 tokens, float32
    assert lora - fa == cfg.num_hidden_layers * x_bytes


def test_only_b_trains_and_a_stays_at_its_init():
    family = FAMILY["llama"]
    model = peftkit.get_peft_model(family.model(), LoraFAConfig(r=4))
    # q_proj (32 x 32) and v_proj (16 out) per block, 2 blocks: B only, r d_out
    assert model.get_nb_trainable_parameters()[0] == 2 * 4 * (32 + 16)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a0 = layer.adapters["default"].lora_A.detach().clone()
    bound = 1 / math.sqrt(32)  # Kaiming uniform with a = sqrt(5) over d_in = 32: U(-1/sqrt(d_in), 1/sqrt(d_in))
    assert a0.abs().max() <= bound and a0.std() > bound / 3
    model.set_adapter("default")  # re-marks the trainable set
    assert not layer.adapters["default"].lora_A.requires_grad
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        family.run(model).pow(2).mean().backward()
        opt.step()
    assert torch.equal(layer.adapters["default"].lora_A, a0)
    assert layer.adapters["default"].lora_B.abs().sum() > 0


@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_files_are_lora_files_that_peft_loads_as_lora(family_name, tmp_path):
    family = FAMILY[family_name]
    targets = ["c_attn", "c_fc"] if family_name == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    ours = peftkit.get_peft_model(family.model(), LoraFAConfig(r=4, lora_alpha=12, target_modules=targets,
                                                                use_rslora=True))
    perturb(ours, only="lora_")
    ours.eval()
    ours.save_pretrained(tmp_path)
    state = peftkit.load_peft_weights(str(tmp_path))
    assert {k.rsplit(".", 2)[-2] for k in state} == {"lora_A", "lora_B"} and all(k.endswith(".weight") for k in state)
    assert len(state) == 2 * len(list(ours.base_model.adapter_layers()))
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, use_rslora=True)
    theirs = peft.PeftModel.from_pretrained(family.model(), tmp_path, config=config).eval()
    with torch.no_grad():
        expected = family.run(ours)
        torch.testing.assert_close(family.run(theirs), expected, atol=1e-5, rtol=1e-5)
        back = peftkit.PeftModel.from_pretrained(family.model(), tmp_path).eval()
        torch.testing.assert_close(family.run(back), expected, atol=0, rtol=0)
    assert isinstance(back.peft_config["default"], LoraFAConfig)


def test_unsupported_layer_is_refused_with_the_model_untouched():
    model = nn.Sequential(nn.Linear(4, 8), nn.Conv2d(8, 4, 1), nn.Embedding(5, 4))
    with untouched(model), pytest.raises(ValueError, match="'1' is a Conv2d; this method wraps Linear, Conv1D"):
        peftkit.get_peft_model(model, LoraFAConfig(r=2, target_modules=["0", "1"]))


def test_lowrank_output_is_s_b_a_x():
    torch.manual_seed(0)
    x, A, B = torch.randn(3, 7), torch.randn(2, 7), torch.randn(5, 2)
    torch.testing.assert_close(FA.lowrank_output(x, A, B, 1.5), 1.5 * (B @ A @ x.t()).t())
