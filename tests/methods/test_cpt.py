"""CPT (context-aware prompt tuning): config compatibility with Hugging Face PEFT, the loss weighted over the
in-context examples and the projection of the perturbation (equal to peft's over training steps), files both
ways, generation, bad input, the families it does not apply to."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch

import peftkit
from peftkit.config import ConfigError
from peftkit.methods.prompt import CPTConfig
from peftkit.methods.prompt.cpt import cpt_loss, project
from peftkit.targeting import NotApplicableError

from ..families import FAMILY, V
from ..parity import assert_loads_both_ways, perturb, train_a_little
from ..parity import field_defaults

# two examples (input template, input, output template, label) and the query's template: types 1..4, 5..8, 9
IDS = [5, 6, 7, 8, 9, 10, 11, 12, 13]
TYPES = [1, 2, 3, 4, 5, 6, 7, 8, 9]
KW = dict(task_type="CAUSAL_LM", cpt_token_ids=IDS, cpt_mask=[1] * 9, cpt_tokens_type_mask=TYPES,
          opt_weighted_loss_type="decay", opt_loss_decay_factor=0.6, opt_projection_epsilon=0.2,
          opt_projection_format_epsilon=0.05)


def _pair(**kw):
    kw = {**KW, **kw}
    theirs = peft.get_peft_model(FAMILY["llama"].model(), peft.CPTConfig(**kw))
    ours = peftkit.get_peft_model(FAMILY["llama"].model(), CPTConfig(**kw))
    return theirs, ours


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (3, 6), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    types = torch.tensor([[1, 2, 2, 3, 4, 4], [1, 2, 3, 4, 4, 0], [0, 1, 2, 3, 4, 4]])
    return ids, labels, types


def _delta(model):
    if isinstance(model, peft.PeftModel):
        return model.prompt_encoder["default"].delta_embedding.weight
    return next(a for _, a in model.base_model.adapters("default")).delta_embedding.weight


def test_config_fields_and_defaults_match_peft(tmp_path):
    assert field_defaults(CPTConfig) == field_defaults(peft.CPTConfig)
    ref, ours = peft.CPTConfig(task_type="CAUSAL_LM"), CPTConfig(task_type="CAUSAL_LM")
    assert (ours.cpt_token_ids, ours.cpt_mask, ours.cpt_tokens_type_mask, ours.num_virtual_tokens) == \
        (ref.cpt_token_ids, ref.cpt_mask, ref.cpt_tokens_type_mask, ref.num_virtual_tokens) == ([0], [1], [1], 1)
    peft.CPTConfig(**KW).save_pretrained(tmp_path / "a")
    loaded = peftkit.PeftConfig.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, CPTConfig) and loaded.cpt_tokens_type_mask == TYPES and loaded.num_virtual_tokens == 9
    CPTConfig(**{**KW, "opt_loss_decay_factor": 0.3}).save_pretrained(tmp_path / "b")
    back = peft.PeftConfig.from_pretrained(tmp_path / "b")
    assert isinstance(back, peft.CPTConfig) and back.opt_loss_decay_factor == 0.3 and back.cpt_token_ids == IDS


@pytest.mark.parametrize(("bad", "match"), [
    ({"cpt_mask": [1, 1]}, r"cpt_mask: expected a list of length 9 .*got length 2"),
    ({"cpt_tokens_type_mask": [1] * 10}, r"cpt_tokens_type_mask: expected a list of length 9 .*got length 10"),
    ({"opt_weighted_loss_type": "linear"}, "opt_weighted_loss_type"),
    ({"cpt_token_ids": [1, -2]}, "cpt_token_ids"),
    ({"opt_projection_epsilon": -0.1}, "opt_projection_epsilon"),
    ({"task_type": "SEQ_CLS"}, r"task_type: expected 'CAUSAL_LM'"),
])
def test_bad_config_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        CPTConfig(**{**KW, **bad})
    if "cpt_mask" in bad or "cpt_tokens_type_mask" in bad:
        with pytest.raises(ValueError):  # peft refuses the same
            peft.CPTConfig(**{**KW, **bad})


def test_unsupported_models_fail_before_any_change():
    bert = FAMILY["bert"].model()
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    with pytest.raises(NotApplicableError, match="causal language models"):
        peftkit.get_peft_model(bert, CPTConfig(**{**KW, "task_type": None}))
    with pytest.raises(NotApplicableError, match="causal language models"):
        peftkit.get_peft_model(FAMILY["t5"].model(), CPTConfig(**{**KW, "task_type": None}))
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in bert.modules())
    assert all(torch.equal(before[k], v) for k, v in bert.state_dict().items())
    llama = FAMILY["llama"].model()
    with pytest.raises(ConfigError, match=rf"cpt_token_ids: expected token ids in \[0, {V}\)"):
        peftkit.get_peft_model(llama, CPTConfig(**{**KW, "cpt_token_ids": [V] * 9}))
    assert not any(isinstance(m, peftkit.AdapterLayer) for m in llama.modules())


def test_loss_and_projection_match_peft_over_training():
    """The weighted loss over the examples, the gradient (zero on label tokens), and the projected
    perturbation are peft's, step after step."""
    theirs, ours = _pair()
    ref, mine = peft.get_peft_model_state_dict(theirs), peftkit.get_peft_model_state_dict(ours)
    assert torch.equal(ref["prompt_embeddings"], mine["prompt_embeddings"]) and list(mine) == ["prompt_embeddings"]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] == 9 * 32
    ids, labels, types = _batch()
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=5.0) for m in (theirs, ours)]
    for m in (theirs, ours):
        m.train()
    for _ in range(3):
        losses = [m(input_ids=ids, labels=labels, input_type_mask=types.clone()).loss for m in (theirs, ours)]
        torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
        for loss in losses:
            loss.backward()
        torch.testing.assert_close(_delta(ours).grad, _delta(theirs).grad, atol=1e-6, rtol=0)
        assert torch.all(_delta(ours).grad[[3, 7]] == 0) and torch.all(_delta(ours).grad[[0, 1, 2, 8]] != 0)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        out = [m(input_ids=ids).logits for m in (theirs, ours)]  # the projection runs at the forward
    torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(_delta(ours), _delta(theirs), atol=1e-7, rtol=0)
    norms, scale = _delta(ours).norm(dim=1), (32 / 2048) ** 0.5
    torch.testing.assert_close(norms[[1, 5]], torch.full((2,), 0.2 * scale), atol=1e-6, rtol=0)  # inputs
    torch.testing.assert_close(norms[[0, 2, 4, 6, 8]], torch.full((5,), 0.05 * scale), atol=1e-6, rtol=0)  # templates
    assert torch.all(norms[[3, 7]] == 0)  # labels never move


def test_loss_weighting_against_the_formula():
    """The mean over targets of CE x decay^k (k: label ids after this one in the row) and the projection."""
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    labels = torch.tensor([[-100, 3, -100, 4, -100, 5, 6], [-100, -100, 1, -100, 2, -100, -100]])
    types = torch.tensor([[1, 4, 2, 8, 1, 12, 12], [0, 0, 4, 3, 8, 0, 0]])
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                                           reduction="none", ignore_index=-100).view(2, 6)
    g = 0.5  # row 0: ids 4, 8, 12 weigh g^2, g, 1; row 1: ids 4, 8 weigh g, 1
    expected = torch.stack([ce[0, 0] * g ** 2, ce[0, 2] * g, ce[0, 4], ce[0, 5], ce[1, 1] * g, ce[1, 3]]).mean()
    torch.testing.assert_close(cpt_loss(logits, labels, types, "decay", g), expected)
    torch.testing.assert_close(cpt_loss(logits, labels, types, "none", g), ce[labels[:, 1:] != -100].mean())
    delta, eps = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4]]), torch.tensor([1.0, 1.0, 1.0])
    assert torch.equal(project(delta, eps), torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.3, 0.4]]))


def _train(model, family) -> None:
    train_a_little(model, family)
    perturb(model)


def test_files_load_both_ways(tmp_path):
    fam = FAMILY["llama"]
    length = fam.inputs()["input_ids"].shape[1]
    fam = dataclasses.replace(fam, output=lambda o: o.logits[:, -length:])  # the real tokens' positions
    assert_loads_both_ways(fam, peft.CPTConfig(**KW), CPTConfig(**KW), tmp_path, train=_train)


def test_generate_matches_peft_without_cache_and_itself_with_cache():
    """peft 0.21.2 re-injects the prompt at every cached step under transformers 5, so only its uncached
    generation is compared; peftkit's cached generation equals its uncached one."""
    theirs, ours = _pair()
    perturb(ours, scale=0.5)
    ours(input_ids=_batch()[0])  # projects the perturbation
    peft.set_peft_model_state_dict(theirs, {k: v.detach().clone() for k, v in
                                            peftkit.get_peft_model_state_dict(ours).items()})
    theirs.eval(), ours.eval()
    ids = _batch()[0]

    def gen(model, use_cache):
        return model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=use_cache, pad_token_id=0)

    expected = gen(theirs, False)
    assert torch.equal(gen(ours, False), expected)
    assert torch.equal(gen(ours, True), expected)
    with ours.disable_adapter():
        assert not torch.equal(gen(ours, True), expected)
