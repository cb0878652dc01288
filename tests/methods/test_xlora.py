"""X-LoRA: config compatibility with Hugging Face PEFT, the mixture math, parity with peft on a tiny Llama (outputs,
files both ways, generate), bad expert folders, and the contract's checks on a real X-LoRA (the registry example
cannot name expert folders: it raises NotApplicableError)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.xlora import XLoraAdapter, XLoraConfig
from peftkit.methods.xlora import functional as XF
from peftkit.targeting import NotApplicableError
from tests.families import FAMILY
from ..parity import field_defaults

IDS = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))


def _base():
    model = FAMILY["llama"].model()
    model.config.use_cache = False  # peft refuses X-LoRA otherwise
    return model


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Two seeded LoRA experts written by peft (different ranks and targets) and one written by peftkit."""
    root = tmp_path_factory.mktemp("xlora")
    folders = {}
    for i, targets in enumerate([["q_proj", "v_proj"], ["q_proj", "o_proj"]]):
        torch.manual_seed(10 + i)
        cfg = peft.LoraConfig(r=2 + i, lora_alpha=4, target_modules=targets, init_lora_weights=False)
        peft.get_peft_model(_base(), cfg).save_pretrained(root / f"e{i}")
        folders[str(i)] = str(root / f"e{i}")
    torch.manual_seed(12)
    ours = peftkit.get_peft_model(_base(), peftkit.LoraConfig(r=2, target_modules=["v_proj", "down_proj"],
                                                               init_lora_weights=False))
    ours.save_pretrained(root / "e2")
    folders["2"] = str(root / "e2")
    peft.get_peft_model(_base(), peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[])).save_pretrained(
        root / "ia3")
    (root / "empty").mkdir()
    return root, folders


def _kw(folders, **extra):
    return dict(task_type="CAUSAL_LM", hidden_size=32, adapters=folders, xlora_depth=2, xlora_size=8,
                **{"xlora_dropout_p": 0.0, **extra})


def _pair(folders, **extra):
    """peft's and peftkit's X-LoRA on the same experts, with the same seeded head."""
    theirs = peft.get_peft_model(_base(), peft.XLoraConfig(**_kw(folders, **extra))).eval()
    ours = peftkit.get_peft_model(_base(), XLoraConfig(**_kw(folders, **extra))).eval()
    g = torch.Generator().manual_seed(5)
    head = {}
    for name, p in theirs.named_parameters():
        if "internal_xlora_classifier" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g))
            head["base_model." + name.split("base_model.", 1)[1]] = p.detach().clone()
    peftkit.set_peft_model_state_dict(ours, head)
    return theirs, ours


def test_config_fields_and_defaults_match_peft(tmp_path):
    assert field_defaults(XLoraConfig) == field_defaults(peft.XLoraConfig)
    peft.XLoraConfig(hidden_size=16, adapters={"a": "x"}, top_k_lora=2, xlora_depth=3).save_pretrained(tmp_path / "a")
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, XLoraConfig) and (loaded.hidden_size, loaded.top_k_lora, loaded.xlora_depth) == (16, 2, 3)
    assert loaded.adapters == {"a": "x"}
    XLoraConfig(hidden_size=8, adapters={"b": "y"}, layerwise_scalings=True).save_pretrained(tmp_path / "b")
    back = peft.PeftConfig.from_pretrained(tmp_path / "b")
    assert isinstance(back, peft.XLoraConfig) and back.layerwise_scalings and back.adapters == {"b": "y"}
    with pytest.warns(UserWarning, match="hidden_size"):
        assert XLoraConfig(adapters={}).hidden_size == 4096  # peft's default, with its warning


@pytest.mark.parametrize("bad", [{"xlora_depth": 0}, {"top_k_lora": 0}, {"xlora_dropout_p": 1.0},
                                 {"softmax_temperature": 0}, {"adapters": {"a": 3}}, {"hidden_size": -1},
                                 {"enable_softmax": "yes"}])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError, match=list(bad)[0]):
        XLoraConfig(**{"hidden_size": 8, "adapters": {}, **bad})


def test_mixture_math_against_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, generator=g)
    As = [torch.randn(r, 6, generator=g) for r in (2, 3)]
    Bs = [torch.randn(4, r, generator=g) for r in (2, 3)]
    w = torch.rand(2, 5, 2, generator=g)
    direct = sum(0.7 * s * (x * w[..., i:i + 1]) @ (Bs[i] @ As[i]).t() for i, s in enumerate((1.5, 0.5)))
    torch.testing.assert_close(XF.mixture(x, As, Bs, [1.5, 0.5], w, 0.7), direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(XF.mixture_reference(x, As, Bs, [1.5, 0.5], w, 0.7), direct, atol=1e-5, rtol=1e-5)
    s = torch.tensor([[[0.1, 0.5, 0.4]]])
    torch.testing.assert_close(XF.layer_weights(s, 2, False), torch.tensor([[[0.0, 0.5, 0.4]]]))
    kept = torch.tensor([0.5, 0.4]).softmax(-1)
    torch.testing.assert_close(XF.layer_weights(s, 2, True), torch.tensor([[[0.0, kept[0], kept[1]]]]))
    assert XF.head_param_count(32, 8, 2, 12) == 8 * 33 + 12 * 9


@pytest.mark.parametrize("extra", [{"layerwise_scalings": True}, {"top_k_lora": 1, "global_scaling_weight": 0.5},
                                   {"top_k_lora": 1, "enable_softmax_topk": True, "enable_softmax": False,
                                    "scaling_pass_value": 0.3}])
def test_outputs_and_trainable_count_match_peft(experts, extra):
    _, folders = experts
    theirs, ours = _pair(folders, **extra)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    layers = [p for p, layer in ours.base_model.adapter_layers()]
    n_out = 3 * (len(layers) if extra.get("layerwise_scalings") else 1)
    assert ours.get_nb_trainable_parameters()[0] == XLoraAdapter.shared_param_count(layers, ours.peft_config["default"])
    assert ours.get_nb_trainable_parameters()[0] == 8 * 33 + n_out * 9
    with torch.no_grad():
        expected, got = theirs(input_ids=IDS).logits, ours(input_ids=IDS).logits
    assert (expected - _base()(input_ids=IDS).logits).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.get_latest_scalings(), theirs.get_latest_scalings(), atol=1e-5, rtol=1e-5)


def test_runtime_setters_and_scalings_log_match_peft(experts):
    """peft's XLoraModel methods on the PeftModel: top-k, global weight, scaling-pass value (None: 1/n), and the
    scalings log with its buckets by sequence length; each setter changes the outputs as peft's does."""
    _, folders = experts
    theirs, ours = _pair(folders, layerwise_scalings=True)
    base = ours(input_ids=IDS).logits.detach()
    for model in (theirs, ours):
        model.set_topk_lora(1)
        model.set_global_scaling_weight(0.5)
        model.set_scaling_pass_value(None)
        model.enable_scalings_logging()
    assert ours.get_global_scaling_weight() == theirs.get_global_scaling_weight() == 0.5
    assert ours.peft_config["default"].scaling_pass_value == pytest.approx(1 / 3)
    with torch.no_grad():
        expected, got = theirs(input_ids=IDS).logits, ours(input_ids=IDS).logits
        theirs(input_ids=IDS[:, :3]), ours(input_ids=IDS[:, :3])
        theirs(input_ids=IDS), ours(input_ids=IDS)
    assert (got - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    logs = ours.get_scalings_log(), theirs.get_scalings_log()
    assert [t.shape for t in logs[0]] == [t.shape for t in logs[1]] and len(logs[0]) == 3
    for a, b in zip(*logs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    buckets = ours.get_bucketed_scalings_log()
    assert {k: v[0] for k, v in buckets.items()} == {k: v[0] for k, v in theirs.get_bucketed_scalings_log().items()}
    assert {k: v[0] for k, v in buckets.items()} == {IDS.shape[1]: [0, 2], 3: [1]}
    ours.disable_scalings_logging()
    with torch.no_grad():
        ours(input_ids=IDS)
    assert len(ours.get_scalings_log()) == 3
    ours.clear_scalings_log()
    assert ours.get_scalings_log() == []
    ours.set_topk_lora(None)
    ours.set_global_scaling_weight(1.0)
    ours.set_scaling_pass_value(0.0)
    torch.testing.assert_close(ours(input_ids=IDS).logits, base, atol=1e-6, rtol=0)


def test_files_both_ways_with_peft(experts, tmp_path):
    _, folders = experts
    # head dropout on: its Linear layers sit at layers.0 / layers.3 (peft mangles a head key whose index is an
    # expert's internal name, "2" here, on load as well)
    theirs, ours = _pair(folders, layerwise_scalings=True, xlora_dropout_p=0.2)
    with torch.no_grad():
        expected = ours(input_ids=IDS).logits
    ours.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert keys == {f"base_model.internal_xlora_classifier.layers.{i}.{p}" for i in (0, 3) for p in ("weight", "bias")}
    loaded = peft.PeftModel.from_pretrained(_base(), tmp_path / "ours", adapters=folders).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
    # peft's file lacks the head's first Linear (its adapter-name filter drops "layers.0"): loaded with a warning,
    # the rest equal peft's; given that layer, the outputs are peft's
    theirs.save_pretrained(tmp_path / "theirs")
    with pytest.warns(UserWarning, match="layers.0"):
        back = peftkit.PeftModel.from_pretrained(_base(), tmp_path / "theirs").eval()
    head = {n.split("base_model.", 1)[1]: p for n, p in theirs.named_parameters() if "xlora_classifier" in n}
    shared = back.base_model.shared_state["default"]
    torch.testing.assert_close(shared.layers_3_weight, head["internal_xlora_classifier.layers.3.weight"])
    with torch.no_grad():
        shared.layers_0_weight.copy_(head["internal_xlora_classifier.layers.0.weight"])
        shared.layers_0_bias.copy_(head["internal_xlora_classifier.layers.0.bias"])
        torch.testing.assert_close(back(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-5, rtol=0)


def test_generate_with_and_without_cache_gives_peft_tokens(experts):
    _, folders = experts
    theirs, ours = _pair(folders, layerwise_scalings=True)
    prompt = IDS[:, :4]
    args = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    ref = theirs.generate(input_ids=prompt, **args)
    ours.get_base_model().generation_config.use_cache = True
    for use_cache in (False, True):
        got = ours.generate(input_ids=prompt, use_cache=use_cache, **args)
        assert torch.equal(got.sequences, ref.sequences), use_cache
        for a, b in zip(got.scores, ref.scores):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("which,match", [("empty", "no adapter_config.json"), ("ia3", "'IA3'"),
                                         ("missing", "no adapter_config.json")])
def test_bad_expert_folder_names_it_and_leaves_the_model_untouched(experts, which, match):
    root, folders = experts
    model = _base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match) as err:
        peftkit.get_peft_model(model, XLoraConfig(**_kw({"0": folders["0"], "bad": str(root / which)})))
    assert str(root / which) in str(err.value) and "'bad'" in str(err.value)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not hasattr(m, "_xlora_hook_handles") for m in model.modules())


def test_no_experts_is_not_applicable():
    with pytest.raises(NotApplicableError, match="adapters is empty"):
        peftkit.get_peft_model(_base(), XLoraConfig(hidden_size=32, adapters={}))


def test_contract_checks_on_a_real_xlora(experts, tmp_path):
    """What tests/test_contract.py checks, on an X-LoRA with experts: disable == base, gradients on the head only
    (the experts stay frozen), the closed-form count, the save / load round trip, refused merge, unload."""
    _, folders = experts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peftkit.get_peft_model(_base(), XLoraConfig(**_kw(folders, xlora_dropout_p=0.1)))
    base_out = _base()(input_ids=IDS).logits
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, base_out, atol=1e-6, rtol=0)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads == trainable and trainable and all("layers_" in n for n in trainable)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(_base(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, out, atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_adapter()
    plain = model.unload()
    assert not plain._forward_pre_hooks and not plain._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, base_out, atol=0, rtol=0)


@pytest.fixture(scope="module")
def embed_experts(tmp_path_factory):
    """Experts on the input embedding: one written by peft (embed_tokens + q/v), one by peftkit (embed_tokens + v),
    their embedding factors seeded-random (LoRA's embedding init zeroes A)."""
    root = tmp_path_factory.mktemp("xlora_embed")
    torch.manual_seed(20)
    theirs = peft.get_peft_model(_base(), peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                          target_modules=["embed_tokens", "q_proj", "v_proj"]))
    theirs.save_pretrained(root / "e0")
    torch.manual_seed(21)
    ours = peftkit.get_peft_model(_base(), peftkit.LoraConfig(r=3, lora_alpha=6, init_lora_weights=False,
                                                              target_modules=["embed_tokens", "v_proj"]))
    g = torch.Generator().manual_seed(22)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ours.save_pretrained(root / "e1")
    return {"0": str(root / "e0"), "1": str(root / "e1")}


@pytest.mark.parametrize("extra", [{"layerwise_scalings": True},
                                   {"layerwise_scalings": True, "top_k_lora": 1, "global_scaling_weight": 0.5},
                                   {"top_k_lora": 1, "enable_softmax_topk": True, "scaling_pass_value": 0.3}])
def test_embedding_experts_match_peft(embed_experts, extra):
    from safetensors.torch import load_file
    keys = set(load_file(f"{embed_experts['1']}/adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys  # peftkit writes peft's embedding keys
    theirs, ours = _pair(embed_experts, **extra)
    layers = [p for p, _ in ours.base_model.adapter_layers()]
    assert layers[0] == "model.embed_tokens" and len(layers) == 1 + 2 * 2  # embed, then q / v of both blocks
    n_out = 2 * (len(layers) if extra.get("layerwise_scalings") else 1)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] == 8 * 33 + n_out * 9
    with torch.no_grad():
        expected, got = theirs(input_ids=IDS).logits, ours(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.get_latest_scalings(), theirs.get_latest_scalings(), atol=1e-5, rtol=1e-5)
    # the embedding's experts carry weight in that match: without them the outputs move
    embed = dict(ours.base_model.adapter_layers())["model.embed_tokens"]
    with torch.no_grad():
        for lora in embed.adapters["default"].experts:
            lora.lora_B.zero_()
        assert (ours(input_ids=IDS).logits - got).abs().max() > 1e-3


def test_embedding_mixture_with_embed_scale_and_padding_idx():
    """The embedding mixture against peft's per-expert formula, on a scaled embedding with a padding row."""
    g = torch.Generator().manual_seed(1)
    base = torch.nn.Embedding(11, 4, padding_idx=0)
    ids = torch.tensor([[0, 3, 7], [10, 0, 2]])
    As = [torch.randn(r, 11, generator=g) for r in (2, 3)]
    Bs = [torch.randn(4, r, generator=g) for r in (2, 3)]
    w = torch.rand(2, 3, 2, generator=g)
    direct = sum(0.7 * s * (As[i].t()[ids] * w[..., i:i + 1]) @ Bs[i].t() for i, s in enumerate((1.5, 0.5))) * 2.0
    got = XF.embedding_mixture(ids, As, Bs, [1.5, 0.5], w, 0.7, base, torch.tensor(2.0))
    torch.testing.assert_close(got, direct, atol=1e-5, rtol=1e-5)


def test_conv2d_expert_is_refused_naming_the_module(tmp_path):
    from tests.families import ConvNet
    peftkit.get_peft_model(ConvNet(), peftkit.LoraConfig(r=2, target_modules=["conv1"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'conv1' is a Conv2d.*feature map"):
        peftkit.get_peft_model(ConvNet(), XLoraConfig(hidden_size=8, adapters={"0": str(tmp_path)}))


def test_expert_saved_with_another_base_embedding_is_refused(tmp_path):
    other = FAMILY["llama"].model(seed=1)
    peft.get_peft_model(other, peft.LoraConfig(r=2, target_modules=["embed_tokens"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"embed_tokens.base_layer.weight.*differs from this model's"):
        peftkit.get_peft_model(_base(), XLoraConfig(**_kw({"0": str(tmp_path)})))
