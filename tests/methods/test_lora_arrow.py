"""Arrow (``create_arrow_model``, ``LoraConfig(arrow_config=ArrowConfig(...))``) against peft 0.21.2 on tiny Llama:
config fields, outputs and prototypes from expert folders written by either library, GenKnowSub, top_k and the
router temperature, the routing math against a direct formula, saved models both ways, refused inputs."""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.config import ConfigError
from peftkit.layers import AdapterLayer, adapter_layers
from peftkit.methods.lora import arrow_math as AM
from tests.families import FAMILY
from tests.parity import field_defaults

LLAMA = FAMILY["llama"]
TARGETS = ["q_proj", "v_proj", "down_proj"]
N_TASK, N_GKS = 3, 2


def _save_expert(lib, seed: int, folder, r: int = 4, alpha: float = 8, targets=TARGETS, **kw) -> str:
    """A LoRA expert with random A and B (``init_lora_weights=False``), saved by ``lib`` (peft or peftkit)."""
    base = LLAMA.model()
    torch.manual_seed(seed)  # after the base model's own seed
    model = lib.get_peft_model(base, lib.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                             init_lora_weights=False, **kw))
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """lib name -> (task folders, general folders); the experts' lora_alpha differ, so their scalings do."""
    out = {}
    for lib in (peft, peftkit):
        root = tmp_path_factory.mktemp(lib.__name__)
        tasks = [_save_expert(lib, 10 + i, root / f"t{i}", alpha=4 * (i + 1)) for i in range(N_TASK)]
        general = [_save_expert(lib, 20 + i, root / f"g{i}") for i in range(N_GKS)]
        out[lib.__name__] = (tasks, general)
    return out


def _arrow(lib, folders, **kw):
    tasks, general = folders
    cfg = lib.ArrowConfig(**kw)
    torch.manual_seed(0)
    return lib.create_arrow_model(LLAMA.model(), tasks, cfg, general_adapter_paths=general if cfg.use_gks else None)


def _routers(model) -> dict[str, torch.Tensor]:
    """Layer path -> prototypes (E, d_in), from either library's model."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer) and "arrow_router" in module.adapters:
            out[name] = module.adapters["arrow_router"].prototypes
        elif hasattr(module, "lora_arrow"):
            out[name] = module.lora_arrow["arrow_router"].prototypes
    return out


def _expert_factors(model, layer: str = "model.layers.1.mlp.down_proj") -> list[torch.Tensor]:
    m = model.get_base_model().get_submodule(layer)
    if isinstance(m, AdapterLayer):
        return [t for n in ("task_0", "task_2") for t in (m.adapters[n].lora_A, m.adapters[n].lora_B)]
    return [t for n in ("task_0", "task_2") for t in (m.lora_A[n].weight, m.lora_B[n].weight)]


# -- the config ------------------------------------------------------------------------------------------------
def test_config_fields_and_defaults_match_peft():
    ours, theirs = dataclasses.fields(peftkit.ArrowConfig), dataclasses.fields(peft.ArrowConfig)
    assert [(f.name, f.init) for f in ours] == [(f.name, f.init) for f in theirs]
    assert field_defaults(peftkit.ArrowConfig) == field_defaults(peft.ArrowConfig) == {
        "top_k": 3, "router_temperature": 1.0, "use_gks": False, "task_adapter_names": None,
        "gks_adapter_names": None, "rng_seed": None}
    # a dict read back from adapter_config.json keeps the names create_arrow_model set (peft drops them)
    saved = {"top_k": 2, "router_temperature": 0.5, "use_gks": True, "task_adapter_names": ["task_0", "task_1"],
             "gks_adapter_names": ["gks_0"], "rng_seed": 4}
    cfg = peftkit.LoraConfig(arrow_config=saved)
    assert isinstance(cfg.arrow_config, peftkit.ArrowConfig) and cfg.to_dict()["arrow_config"] == saved
    theirs = peft.ArrowConfig(top_k=1, rng_seed=2)
    theirs.task_adapter_names = ["a"]
    converted = peftkit.LoraConfig(arrow_config=theirs).arrow_config
    assert (converted.top_k, converted.rng_seed, converted.task_adapter_names) == (1, 2, ["a"])


@pytest.mark.parametrize("kwargs,field", [
    ({"top_k": 0}, "top_k"), ({"top_k": -1}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"top_k": True}, "top_k"),
    ({"router_temperature": 0}, "router_temperature"), ({"router_temperature": -1.0}, "router_temperature"),
    ({"router_temperature": "hot"}, "router_temperature"), ({"use_gks": 1}, "use_gks"),
    ({"rng_seed": "7"}, "rng_seed"),
])
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"ArrowConfig.{field}"):
        peftkit.ArrowConfig(**kwargs)


def test_lora_fields_arrow_refuses_beside_it():
    with pytest.raises(ConfigError, match="arrow_config.*use_dora|use_dora.*arrow_config"):
        peftkit.LoraConfig(use_dora=True, arrow_config=peftkit.ArrowConfig())
    with pytest.raises(ConfigError, match="LoraConfig.arrow_config.*target_parameters"):
        peftkit.LoraConfig(arrow_config=peftkit.ArrowConfig(), target_parameters=["mlp.down_proj"])
    with pytest.raises(ConfigError, match="LoraConfig.arrow_config"):
        peftkit.LoraConfig(arrow_config=3)


# -- outputs and prototypes against peft -----------------------------------------------------------------------
@pytest.mark.parametrize("writer,kw", [
    ("peft", {"top_k": 2, "rng_seed": 3}),
    ("peftkit", {"top_k": 1, "router_temperature": 0.5, "use_gks": True}),  # rng_seed None: the global generator
    ("peft", {"top_k": 3, "router_temperature": 2.0, "use_gks": True, "rng_seed": 7}),
    ("peftkit", {"top_k": 2}),
])
def test_outputs_and_prototypes_match_peft(experts, writer, kw):
    theirs, ours = _arrow(peft, experts[writer], **kw), _arrow(peftkit, experts[writer], **kw)
    before = [t.clone() for t in _expert_factors(ours)]
    torch.testing.assert_close(LLAMA.run(ours), LLAMA.run(theirs), atol=1e-5, rtol=0)
    protos, ref = _routers(ours), _routers(theirs)
    assert set(protos) == set(ref) and len(protos) == 2 * len(TARGETS)
    for name, p in protos.items():
        assert p.shape == ref[name].shape == (N_TASK, ref[name].shape[1])
        torch.testing.assert_close(p, ref[name], atol=1e-6, rtol=0, msg=name)
    # GenKnowSub changed the experts' factors as peft's did (or left them alone)
    after, ref_after = _expert_factors(ours), _expert_factors(theirs)
    for a, r, b in zip(after, ref_after, before):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=0)
        assert torch.equal(a, b) is (not kw.get("use_gks", False))
    # a second call reuses the prototypes (no new draws) and gives the same output
    torch.testing.assert_close(LLAMA.run(ours), LLAMA.run(theirs), atol=1e-5, rtol=0)
    assert peftkit.ArrowConfig is not peft.ArrowConfig  # the reference is the real peft


def test_top_k_temperature_and_gks_change_the_output(experts):
    folders = experts["peftkit"]
    base = LLAMA.run(LLAMA.model())
    outs = {k: LLAMA.run(_arrow(peftkit, folders, rng_seed=1, **kw)) for k, kw in {
        "k1": {"top_k": 1}, "k3": {"top_k": 3}, "k3_cold": {"top_k": 3, "router_temperature": 0.02},
        "k3_gks": {"top_k": 3, "use_gks": True}}.items()}
    for a in outs:
        assert not torch.allclose(outs[a], base, atol=1e-4)
        for b in outs:
            assert a == b or not torch.allclose(outs[a], outs[b], atol=1e-4), (a, b)


# -- the math, directly ----------------------------------------------------------------------------------------
def test_prototype_is_the_top_right_singular_vector():
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(20, 4, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(12, 4, generator=gen))
    B, A = U * torch.tensor([5.0, 1.0, 0.5, 0.2]), V.T  # B A = U diag(s) V^T: top right singular vector V[:, 0]
    v = AM.top_right_singular_vector(A, B, seed=1)
    assert abs(float(v @ V[:, 0])) == pytest.approx(1.0, abs=1e-6) and float(v.norm()) == pytest.approx(1.0)
    torch.testing.assert_close(v, AM.top_right_singular_vector(A, B, seed=1), atol=0, rtol=0)


def test_layer_output_is_the_routed_sum(experts):
    model = _arrow(peftkit, experts["peft"], top_k=2, router_temperature=0.7, rng_seed=5)
    layer = model.get_base_model().model.layers[0].self_attn.v_proj
    seen = {}
    layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    LLAMA.run(model)
    x, out = seen["x"].reshape(-1, seen["x"].shape[-1]), seen["out"].reshape(-1, seen["out"].shape[-1])
    protos = layer.adapters["arrow_router"].prototypes
    expected = layer.base_layer(x)
    for t in range(x.shape[0]):
        score = (protos @ x[t]).abs()
        keep = score.topk(2).indices
        w = torch.softmax(score[keep] / 0.7, dim=0)
        for wi, e in zip(w, keep.tolist()):
            a = layer.adapters[f"task_{e}"]
            assert a.scaling == 4 * (e + 1) / 4  # each expert keeps its own lora_alpha / r
            expected[t] += wi * a.scaling * (a.lora_B @ (a.lora_A @ x[t]))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # prototypes: 15 power iterations towards the top right singular vector of B A, from randn(d_in) seeded with
    # rng_seed: M^15 v0 / ||M^15 v0|| with M = (B A)^T (B A), in float64
    for e in range(N_TASK):
        a = layer.adapters[f"task_{e}"]
        delta = (a.lora_B @ a.lora_A).double()
        v0 = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(5)).double()
        v = torch.linalg.matrix_power(delta.T @ delta, 15) @ v0
        torch.testing.assert_close(protos[e].double(), v / v.norm(), atol=1e-5, rtol=0)
        assert abs(float(protos[e] @ torch.linalg.svd(delta.float()).Vh[0])) > 0.99


def test_gks_subtracts_the_mean_general_factors(experts):
    tasks, general = experts["peft"]
    model = _arrow(peftkit, experts["peft"], top_k=2, use_gks=True, rng_seed=0)
    layer = model.get_base_model().model.layers[1].self_attn.q_proj
    orig = {n: (layer.adapters[n].lora_A.clone(), layer.adapters[n].lora_B.clone()) for n in layer.adapters}
    LLAMA.run(model)
    avg_A = (orig["gks_0"][0] + orig["gks_1"][0]) / 2
    avg_B = (orig["gks_0"][1] + orig["gks_1"][1]) / 2
    for i in range(N_TASK):
        a = layer.adapters[f"task_{i}"]
        torch.testing.assert_close(a.lora_A, orig[f"task_{i}"][0] - avg_A, atol=1e-7, rtol=0)
        torch.testing.assert_close(a.lora_B, orig[f"task_{i}"][1] - avg_B, atol=1e-7, rtol=0)
    for n in ("gks_0", "gks_1", "arrow_router"):  # the general adapters and the router are left as they were
        assert torch.equal(layer.adapters[n].lora_A, orig[n][0])
    LLAMA.run(model)  # once only
    torch.testing.assert_close(layer.adapters["task_0"].lora_A, orig["task_0"][0] - avg_A, atol=1e-7, rtol=0)


# -- the model around the router -------------------------------------------------------------------------------
def test_state_merge_disable_and_a_later_expert_like_peft(experts, tmp_path):
    theirs, ours = _arrow(peft, experts["peft"], top_k=2, rng_seed=1), _arrow(peftkit, experts["peft"], top_k=2,
                                                                              rng_seed=1)
    assert ours.active_adapters == theirs.active_adapters == ["arrow_router"]
    # the router's own (unused) LoRA factors train, as peft's: r (d_in + d_out) per target, two layers
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] == 2 * 4 * ((32 + 32) + (32 + 16) + (37 + 32))
    base = LLAMA.run(LLAMA.model())
    with ours.disable_adapter():
        torch.testing.assert_close(LLAMA.run(ours), base, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="Cannot merge an active Arrow router adapter"):
        ours.merge_and_unload()
    assert len(adapter_layers(ours)) == 2 * len(TARGETS)  # nothing merged, nothing unloaded
    # an expert loaded after the router joins the routing at the next forward (peft's on_adapter_change)
    extra = _save_expert(peft, 99, tmp_path / "t3", alpha=16)
    for model in (theirs, ours):
        LLAMA.run(model)
        model.load_adapter(extra, adapter_name="task_3")
        model.set_adapter("arrow_router")
    torch.testing.assert_close(LLAMA.run(ours), LLAMA.run(theirs), atol=1e-5, rtol=0)
    assert all(p.shape[0] == 4 for p in _routers(ours).values())


def _keys(folder) -> set[str]:
    return set(load_file(f"{folder}/adapter_model.safetensors"))


def test_saved_arrow_model_files_both_ways(experts, tmp_path):
    kw = {"top_k": 2, "rng_seed": 2, "use_gks": True}
    theirs, ours = _arrow(peft, experts["peftkit"], **kw), _arrow(peftkit, experts["peftkit"], **kw)
    theirs.save_pretrained(tmp_path / "peft"), ours.save_pretrained(tmp_path / "peftkit")  # before any forward
    expected = LLAMA.run(theirs)
    for name in ("task_0", "task_2", "gks_1", "arrow_router"):
        assert _keys(tmp_path / "peft" / name) == _keys(tmp_path / "peftkit" / name), name
    router = json.loads((tmp_path / "peftkit" / "arrow_router" / "adapter_config.json").read_text())
    ref = json.loads((tmp_path / "peft" / "arrow_router" / "adapter_config.json").read_text())
    assert router["arrow_config"] == ref["arrow_config"] == {
        "top_k": 2, "router_temperature": 1.0, "use_gks": True, "task_adapter_names": ["task_0", "task_1", "task_2"],
        "gks_adapter_names": ["gks_0", "gks_1"], "rng_seed": 2}
    assert (router["target_modules"], router["r"]) == (sorted(TARGETS), ref["r"])
    assert peft.LoraConfig.from_pretrained(tmp_path / "peftkit" / "arrow_router").arrow_config.top_k == 2
    # peftkit's saved experts in peft's create_arrow_model, and peft's in ours
    for writer, lib in (("peftkit", peft), ("peft", peftkit)):
        root = tmp_path / writer
        model = _arrow(lib, ([root / f"task_{i}" for i in range(N_TASK)], [root / "gks_0", root / "gks_1"]), **kw)
        torch.testing.assert_close(LLAMA.run(model), expected, atol=1e-5, rtol=0, msg=writer)
    # the whole saved model, router included, loads in peftkit (peft cannot: it drops task_adapter_names)
    root = tmp_path / "peft"
    model = peftkit.PeftModel.from_pretrained(LLAMA.model(), root / "task_0", adapter_name="task_0")
    for name in ("task_1", "task_2", "gks_0", "gks_1", "arrow_router"):
        model.load_adapter(root / name, adapter_name=name)
    model.set_adapter("arrow_router")
    torch.testing.assert_close(LLAMA.run(model), expected, atol=1e-5, rtol=0)


# -- refused inputs ----------------------------------------------------------------------------------------------
def _untouched(model) -> bool:
    return not adapter_layers(model) and not any(type(m).__name__ == "AdapterLayer" for m in model.modules())


def test_bad_inputs_name_the_field_and_leave_the_model(experts, tmp_path):
    tasks, general = experts["peftkit"]
    model = LLAMA.model()
    cases = [
        (([tasks[0], tasks[1]], peftkit.ArrowConfig(top_k=3)), ConfigError, r"ArrowConfig.top_k=3.*\(2 task"),
        (([], peftkit.ArrowConfig()), ValueError, "task_specific_adapter_paths"),
        (([tasks[0], str(tmp_path / "nowhere")], peftkit.ArrowConfig(top_k=1)), FileNotFoundError,
         r"task_specific_adapter_paths\[1\] = '.*nowhere'"),
        (([tasks[0], str(tmp_path)], peftkit.ArrowConfig(top_k=1)), ValueError, "does not contain 'adapter_config"),
        ((tasks, peftkit.ArrowConfig(use_gks=True)), ValueError, "general_adapter_paths"),
    ]
    for (paths, cfg), err, pattern in cases:
        with pytest.raises(err, match=pattern):
            peftkit.create_arrow_model(model, paths, cfg)
    with pytest.raises(FileNotFoundError, match=r"general_adapter_paths\[0\]"):
        peftkit.create_arrow_model(model, tasks, peftkit.ArrowConfig(use_gks=True), general_adapter_paths=["/no/x"])
    assert _untouched(model)
    # experts that differ: rank, targets, layer type (found after loading: the model is restored)
    bad = {
        "rank": (_save_expert(peftkit, 1, tmp_path / "r8", r=8), ValueError, "rank mismatch: r=8"),
        "targets": (_save_expert(peftkit, 1, tmp_path / "qv", targets=["q_proj", "v_proj"]), ValueError,
                    "target_modules mismatch"),
        "embedding": (_save_expert(peftkit, 1, tmp_path / "emb", targets=["embed_tokens"]), TypeError,
                      "Linear-like layers.*embed_tokens"),
    }
    for what, (folder, err, pattern) in bad.items():
        paths = [folder, tasks[0]] if what == "embedding" else [tasks[0], folder]
        index = 0 if what == "embedding" else 1
        with pytest.raises(err, match=rf"task_specific_adapter_paths\[{index}\] = .*{pattern}"):
            peftkit.create_arrow_model(model, paths, peftkit.ArrowConfig(top_k=1))
        assert _untouched(model), what
    torch.testing.assert_close(LLAMA.run(model), LLAMA.run(LLAMA.model()), atol=0, rtol=0)


def test_router_without_experts_is_refused():
    cfg = peftkit.LoraConfig(r=4, target_modules=["q_proj"], arrow_config=peftkit.ArrowConfig(top_k=1))
    plain = LLAMA.model()
    with pytest.raises(ValueError, match="LoraConfig.arrow_config.*needs its LoRA experts"):
        peftkit.get_peft_model(plain, cfg)
    assert _untouched(plain)
    model = peftkit.get_peft_model(LLAMA.model(), peftkit.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=r"ArrowConfig.top_k=2.*\(1: \['default'\]\)"):
        model.add_adapter("router", peftkit.LoraConfig(r=4, target_modules=["q_proj"],
                                                       arrow_config=peftkit.ArrowConfig(top_k=2)))
    assert list(model.peft_config) == ["default"]


def test_mixed_batch_routes_rows_to_the_router_or_the_base(experts):
    model = _arrow(peftkit, experts["peft"], top_k=2, rng_seed=4)
    ids = LLAMA.inputs()["input_ids"]
    with torch.no_grad():
        arrow = model(input_ids=ids).logits
        base = LLAMA.model()(input_ids=ids).logits
        mixed = model(input_ids=ids, adapter_names=["arrow_router", "__base__"]).logits
    torch.testing.assert_close(mixed[0], arrow[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], base[1], atol=1e-5, rtol=0)


def test_a_target_no_expert_adapts_is_left_unchanged(tmp_path):
    tasks = [_save_expert(peftkit, 30 + i, tmp_path / f"t{i}", targets=["q_proj"], layers_to_transform=[0])
             for i in range(2)]
    model = peftkit.create_arrow_model(LLAMA.model(), tasks, peftkit.ArrowConfig(top_k=1, rng_seed=0))
    layers = model.get_base_model().model.layers
    assert "arrow_router" in layers[1].self_attn.q_proj.adapters  # the router targets every q_proj, as peft's
    x = torch.randn(3, 32)
    torch.testing.assert_close(layers[1].self_attn.q_proj(x), layers[1].self_attn.q_proj.base_layer(x), atol=0,
                               rtol=0)
    assert not torch.allclose(layers[0].self_attn.q_proj(x), layers[0].self_attn.q_proj.base_layer(x), atol=1e-4)
