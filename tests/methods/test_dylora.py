"""DyLoRA: the config, the rank draw in training (one rank per step, uniform over [r_min, r]), the truncated
formula and its scale, the frozen update, set_rank against Hugging Face PEFT's LoRA of the truncated factors,
every rank after training, and the files (LoRA's keys + the rank in the config)."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.dylora import DyLoraAdapter, DyLoraConfig, set_rank
from peftkit.methods.dylora import functional as DF

from ..families import FAMILY, untouched
from ..parity import field_defaults, perturb

SHARED = ("r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias",
          "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def test_config_fields_are_loras_plus_the_rank_range(tmp_path):
    ours, theirs = field_defaults(DyLoraConfig), field_defaults(peft.LoraConfig)
    assert {k: ours[k] for k in SHARED} == {k: theirs[k] for k in SHARED}
    assert set(ours) - set(theirs) == {"r_min", "frozen", "inference_rank"}
    DyLoraConfig(r=6, r_min=2, inference_rank=3, frozen=True).save_pretrained(tmp_path)
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, DyLoraConfig) and (loaded.r, loaded.r_min, loaded.inference_rank) == (6, 2, 3)
    assert loaded.frozen and loaded.rank == 3 and DyLoraConfig(r=5).rank == 5


@pytest.mark.parametrize("bad", [{"r_min": 0}, {"r_min": 9}, {"r_min": 2.0}, {"inference_rank": 0},
                                 {"inference_rank": 9}, {"frozen": "yes"}, {"lora_dropout": -0.1}, {"r": 0},
                                 {"init_lora_weights": "pissa"}])
def test_bad_config_values_name_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(ConfigError, match=f"DyLoraConfig.{field}"):
        DyLoraConfig(**bad)


def _model(r=4, r_min=1, alpha=8, frozen=False, family="llama", **kw):
    fam = FAMILY[family]
    targets = ["c_attn", "c_fc"] if family == "gpt2" else TARGETS
    config = DyLoraConfig(r=r, r_min=r_min, lora_alpha=alpha, frozen=frozen, target_modules=targets, **kw)
    model = peftkit.get_peft_model(fam.model(), config)
    perturb(model, only="lora_")
    return fam, model


def _adapters(model):
    return [layer.adapters["default"] for _, layer in model.base_model.adapter_layers()]


def test_truncated_factors_and_scale_are_the_papers():
    torch.manual_seed(0)
    A, B, x = torch.randn(5, 7), torch.randn(6, 5), torch.randn(3, 7)
    for b in range(1, 6):
        torch.testing.assert_close(DF.output(x, A, B, b, 10.0), (10.0 / b) * x @ A[:b].t() @ B[:, :b].t())
        torch.testing.assert_close(DF.delta(A, B, b, 10.0), (10.0 / b) * B[:, :b] @ A[:b])
    A_b, B_b = DF.truncate(A, B, 3, frozen=True)
    assert torch.equal(A_b, A[:3]) and torch.equal(B_b, B[:, :3])


def test_each_training_call_draws_one_rank_for_all_layers_uniformly():
    fam, model = _model(r=5, r_min=2)
    model.train()
    torch.manual_seed(0)
    drawn = []
    for _ in range(60):
        model(**fam.inputs())
        ranks = {a.train_rank for a in _adapters(model)}
        assert len(ranks) == 1  # one rank for the whole model in a step
        drawn.append(ranks.pop())
    counts = torch.bincount(torch.tensor(drawn), minlength=6)
    assert counts[:2].sum() == 0 and (counts[2:] >= 5).all()  # every rank of [r_min, r], nothing else
    model.eval()
    model(**fam.inputs())
    assert all(a.active_rank == 5 for a in _adapters(model))  # outside training: the inference rank (r)


def test_training_forward_uses_the_drawn_rank_and_its_scale():
    fam, model = _model(r=4, alpha=6)
    model.train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    captured = {}
    layer.register_forward_hook(lambda m, args, out: captured.update(x=args[0], out=out))
    torch.manual_seed(2)
    for _ in range(20):  # a call whose draw is below r
        model(**fam.inputs())
        a, b = layer.adapters["default"], layer.adapters["default"].train_rank
        if b < 4:
            break
    assert b < 4
    x = captured["x"]
    expected = layer.base_layer(x) + (6 / b) * x @ a.lora_A[:b].t() @ a.lora_B[:, :b].t()
    torch.testing.assert_close(captured["out"], expected, atol=1e-6, rtol=1e-5)
    assert a.scaling == 6 / b


@pytest.mark.parametrize("frozen", [False, True])
def test_gradients_reach_the_drawn_ranks_only(frozen):
    fam, model = _model(r=4, frozen=frozen)
    model.train()
    torch.manual_seed(4)
    for _ in range(20):  # a step whose draw is below r
        model.zero_grad()
        fam.run(model).pow(2).mean().backward()
        b = _adapters(model)[0].train_rank
        if b < 4:
            break
    assert b < 4
    for a in _adapters(model):
        rows = a.lora_A.grad.abs().sum(1) > 0
        cols = a.lora_B.grad.abs().sum(0) > 0
        trained = torch.arange(4) == b - 1 if frozen else torch.arange(4) < b
        assert torch.equal(rows, trained) and torch.equal(cols, trained)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_set_rank_equals_peft_lora_of_the_truncated_factors(family):
    fam, model = _model(r=6, alpha=9, family=family)
    targets = ["c_attn", "c_fc"] if family == "gpt2" else TARGETS
    for k in (1, 3, 6):
        model.set_rank(k)  # the model method (attribute forwarding to the adapted model)
        assert all(a.rank == k for a in _adapters(model)) and model.peft_config["default"].inference_rank == k
        ref = peft.get_peft_model(fam.model(), peft.LoraConfig(r=k, lora_alpha=9, target_modules=targets))
        for (path, layer), (_, a) in zip(model.base_model.adapter_layers(), model.base_model.adapters("default")):
            theirs = ref.base_model.model.get_submodule(path)
            with torch.no_grad():
                theirs.lora_A["default"].weight.copy_(a.lora_A[:k])
                theirs.lora_B["default"].weight.copy_(a.lora_B[:, :k])
            assert theirs.scaling["default"] == 9 / k
        with torch.no_grad():
            torch.testing.assert_close(fam.run(model.eval()), fam.run(ref.eval()), atol=1e-6, rtol=1e-5)
        model.merge_adapter()
        with torch.no_grad():
            torch.testing.assert_close(fam.run(model), fam.run(ref), atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()


def test_every_rank_after_dylora_training_has_a_finite_loss():
    family = FAMILY["bert"]
    torch.manual_seed(0)
    model = peftkit.get_peft_model(family.model(), DyLoraConfig(r=4, r_min=1, lora_alpha=8, task_type="SEQ_CLS"))
    ids, labels = torch.randint(0, 99, (8, 9)), torch.randint(0, 2, (8,))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    drawn = set()
    for _ in range(12):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        drawn.add(_adapters(model)[0].train_rank)
    assert len(drawn) > 1
    model.eval()
    losses = []
    with torch.no_grad():
        for k in range(1, 5):
            set_rank(model, k)
            losses.append(model(input_ids=ids, labels=labels).loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and len(set(losses)) == 4  # each rank is its own model


def test_files_hold_lora_keys_and_the_rank_and_load_at_it(tmp_path):
    fam, model = _model(r=4, alpha=8)
    set_rank(model, 2)
    model.eval()
    with torch.no_grad():
        at_two = fam.run(model)
    model.save_pretrained(tmp_path)
    state = peftkit.load_peft_weights(str(tmp_path))
    assert {k.rsplit(".", 2)[-2] for k in state} == {"lora_A", "lora_B"} and all(k.endswith(".weight") for k in state)
    assert {tuple(v.shape)[0] for k, v in state.items() if ".lora_A." in k} == {4}  # stored whole, at r
    loaded = peftkit.PeftModel.from_pretrained(fam.model(), tmp_path)
    assert loaded.peft_config["default"].inference_rank == 2
    with torch.no_grad():
        torch.testing.assert_close(fam.run(loaded), at_two, atol=0, rtol=0)
        set_rank(loaded, 4)
        set_rank(model, 4)
        torch.testing.assert_close(fam.run(loaded), fam.run(model), atol=0, rtol=0)
    # at rank r the file is a plain LoRA file for peft
    theirs = peft.PeftModel.from_pretrained(fam.model(), tmp_path,
                                            config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        torch.testing.assert_close(fam.run(theirs.eval()), fam.run(model), atol=1e-5, rtol=1e-5)


def test_set_rank_refusals_change_nothing():
    fam, model = _model(r=4)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match=r"rank must be an integer in \[1, r=4\]"):
            set_rank(model, bad)
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged at rank 4; unmerge"):
        set_rank(model, 2)
    model.unmerge_adapter()
    assert all(a.rank == 4 for a in _adapters(model)) and model.peft_config["default"].inference_rank is None
    with pytest.raises(ValueError, match="no DyLoRA adapter named 'other'"):
        set_rank(model, 2, adapter_name="other")


def test_unload_removes_the_hook_and_the_model_method():
    fam, model = _model()
    inner = model.base_model.model
    assert callable(inner.set_rank) and inner._forward_pre_hooks
    plain = model.unload()
    assert plain is inner and not hasattr(plain, "set_rank") and not plain._forward_pre_hooks


def test_unsupported_layer_is_refused_with_the_model_untouched():
    model = nn.Sequential(nn.Linear(4, 8), nn.Embedding(5, 4))
    with untouched(model), pytest.raises(ValueError, match="'1' is a Embedding; this method wraps Linear, Conv1D"):
        peftkit.get_peft_model(model, DyLoraConfig(r=2, target_modules=["0", "1"]))
    assert DyLoraAdapter.param_count(nn.Linear(4, 8), DyLoraConfig(r=3)) == 3 * (4 + 8)
