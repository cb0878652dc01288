"""Adapter folders stay whole: a save killed at any point leaves the old adapter or the new one (never new
weights next to the old config), stale temporaries are cleaned by the next save, an adapter file cannot
overwrite base weights other than the embedding / output layers peft saves, a failed load leaves the model
exactly as it was, and ``save_pretrained(selected_adapters=...)`` checks its names before writing."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.checkpoint import CheckpointError

from .families import FAMILY, untouched
from .train_helpers import env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["adapter_config.json", "adapter_model.safetensors"]
TOP = sorted([*FILES, "README.md"])  # save_pretrained's own folder also holds the model card, as with peft
UP_PROJ = "base_model.model.model.layers.0.mlp.up_proj.weight"


@pytest.fixture
def llama():
    return FAMILY["llama"]


def _lora(seed, family, alpha):
    """LoRA on the family's base model (always seed 0) with random A and B drawn from ``seed``."""
    base = family.model()
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=alpha, init_lora_weights=False))


def _loaded_logits(family, folder):
    return family.run(PeftModel.from_pretrained(family.model(), folder))


def _is_close(a, b):
    return torch.allclose(a, b, atol=1e-6, rtol=0)


# -- 1. a save is all or nothing ---------------------------------------------------------------------------

# The child saves a new adapter (same shapes, other weights and scaling) over the old one and SIGKILLs itself
# right before / after the rename of one file into place (both files are renamed with os.replace).
CHILD = r"""
import os, signal, sys
import torch
torch.set_num_threads(1)
from tests.families import FAMILY
import peftkit
folder, out, when, target = sys.argv[1:5]
family = FAMILY["llama"]
base = family.model()
torch.manual_seed(7)
model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=4, lora_alpha=32, init_lora_weights=False))
torch.save(family.run(model), out)
real = os.replace
def replace(src, dst, *args, **kwargs):
    if when == "before" and os.path.basename(dst) == target:
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, *args, **kwargs)
    if when == "after" and os.path.basename(dst) == target:
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
model.save_pretrained(folder)
sys.exit(3)
"""


def _killed_save(folder, tmp_path, when, target):
    out = tmp_path / "new_logits.pt"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(out), when, target], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return torch.load(out)


@pytest.mark.parametrize(("when", "target"), [("after", "adapter_model.safetensors"),
                                              ("before", "adapter_model.safetensors"),
                                              ("after", "adapter_config.json"),
                                              ("before", ".peftkit-commit.json")])
def test_killed_save_leaves_the_old_or_the_new_adapter(llama, tmp_path, when, target):
    folder = tmp_path / "adapter"
    _lora(0, llama, 8).save_pretrained(folder)
    old = _loaded_logits(llama, folder)
    new = _killed_save(folder, tmp_path, when, target)
    assert not _is_close(old, new)
    listing = sorted(os.listdir(folder))
    got = _loaded_logits(llama, folder)
    assert _is_close(got, old) or _is_close(got, new), f"a mix of two adapters loaded (kill {when} {target})"
    assert sorted(os.listdir(folder)) == listing  # loading never writes
    # the next save cleans what the killed one left and writes a whole adapter
    third = _lora(11, llama, 16)
    third.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == TOP
    assert _is_close(_loaded_logits(llama, folder), llama.run(third))


def test_interrupted_save_record_is_ignored_once_the_folder_is_rewritten(llama, tmp_path):
    """peft (or anyone) writing the folder after a killed peftkit save wins over what that save left."""
    folder = tmp_path / "adapter"
    _lora(0, llama, 8).save_pretrained(folder)
    _killed_save(folder, tmp_path, "after", "adapter_model.safetensors")
    base = llama.model()
    torch.manual_seed(5)
    theirs = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=16, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    theirs.save_pretrained(folder)
    assert _is_close(_loaded_logits(llama, folder), llama.run(theirs))
    _lora(11, llama, 16).save_pretrained(folder)
    assert sorted(n for n in os.listdir(folder) if not n.startswith("README")) == FILES


def test_crash_while_writing_the_run_adapter_leaves_the_old_or_the_new_one(tmp_path, monkeypatch):
    """``peftkit train``'s final ``adapter/``: a crash between the two renames (simulated in process)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftkit.train import load_recipe, train
    from peftkit.train.loop import Trainer

    from .train_helpers import text_recipe

    steps = ["train.max_steps=4", "train.save_every=0"]
    first = load_recipe(str(text_recipe(tmp_path)), steps)
    train(first, quiet=True)
    adapter = os.path.join(first.output_dir, "adapter")
    tok = AutoTokenizer.from_pretrained(first.model)
    batch = tok(["good great", "awful sad dull"], return_tensors="pt", padding=True)

    def logits(model):
        with torch.no_grad():
            return model.eval()(**batch).logits

    def base():
        return AutoModelForSequenceClassification.from_pretrained(first.model, num_labels=2)

    old = logits(PeftModel.from_pretrained(base(), adapter))

    class Crash(BaseException):
        pass

    real = os.replace

    def replace(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if os.path.abspath(dst) == os.path.abspath(os.path.join(adapter, "adapter_model.safetensors")):
            raise Crash

    second = Trainer(load_recipe(str(text_recipe(tmp_path)), [*steps, "peft.lora_alpha=64", "train.seed=9"]),
                     quiet=True)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Crash):
        second.run()
    monkeypatch.undo()
    new = logits(second.model)
    got = logits(PeftModel.from_pretrained(base(), adapter))
    assert not torch.allclose(old, new, atol=1e-5)
    assert torch.allclose(got, old, atol=1e-5, rtol=0) or torch.allclose(got, new, atol=1e-5, rtol=0)


def test_next_save_removes_stale_temporaries_only(llama, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    stale = [".tmp-abcd1234-adapter_model.safetensors", ".tmp-x_9yz000-adapter_config.json"]
    keep = ["tokenizer.json", ".tmp-something-else.txt", "notes.tmp"]
    for name in stale + keep:
        (folder / name).write_text("x")
    (folder / "other").mkdir()
    (folder / "other" / "adapter_config.json").write_text("{}")
    _lora(0, llama, 8).save_pretrained(folder)
    assert sorted(os.listdir(folder)) == sorted([*TOP, *keep, "other"])
    assert (folder / "other" / "adapter_config.json").read_text() == "{}"


def test_saving_in_the_other_format_replaces_the_weights_file(llama, tmp_path):
    """A new ``adapter_model.bin`` next to an old ``adapter_model.safetensors`` would load the old weights
    (safetensors are preferred): the save removes the other format in the same commit."""
    _lora(0, llama, 8).save_pretrained(tmp_path)
    new = _lora(3, llama, 16)
    new.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    assert _is_close(_loaded_logits(llama, tmp_path), llama.run(new))


def test_stale_checkpoint_folders_of_killed_runs_are_removed(llama, tmp_path):
    from peftkit.train.state import save_checkpoint

    root = tmp_path / "checkpoints"
    (root / ".tmp-step-0000003").mkdir(parents=True)
    (root / ".tmp-step-0000003" / "adapter_model.safetensors").write_text("partial")
    save_checkpoint(str(tmp_path), 4, _lora(0, llama, 8), {"loss_sum": 0.0}, keep_last=2)
    save_checkpoint(str(tmp_path), 4, _lora(1, llama, 8), {"loss_sum": 1.0}, keep_last=2)  # the same step again
    assert sorted(os.listdir(root)) == ["step-0000004"]


# -- 2. what an adapter file may write into the base ------------------------------------------------------


def _snapshot(model):
    return ([(n, m) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def _assert_unchanged(model, snap):
    modules, state, flags = _snapshot(model)
    assert [n for n, _ in modules] == [n for n, _ in snap[0]]
    assert all(a is b for (_, a), (_, b) in zip(modules, snap[0]))
    assert state.keys() == snap[1].keys() and all(torch.equal(state[k], snap[1][k]) for k in state)
    assert flags == snap[2]


def test_a_base_key_outside_the_embeddings_is_refused(llama, tmp_path):
    _lora(0, llama, 8).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    state[UP_PROJ] = torch.zeros(37, 32)
    save_file(state, path)
    base = llama.model()
    snap = _snapshot(base)
    with pytest.raises(CheckpointError) as err:
        PeftModel.from_pretrained(base, tmp_path)
    assert UP_PROJ in str(err.value) and "adapter_model.safetensors" in str(err.value)
    _assert_unchanged(base, snap)
    model = _lora(0, llama, 8)
    snap = _snapshot(model)
    with pytest.raises(CheckpointError, match="up_proj"):
        model.load_adapter(tmp_path, adapter_name="other")
    with pytest.raises(CheckpointError, match="up_proj"):
        peftkit.set_peft_model_state_dict(model, state)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["embed_tokens", "q_proj"]])
def test_embedding_layers_saved_by_peft_still_load(llama, tmp_path, targets):
    theirs = peft.get_peft_model(llama.model(), peft.LoraConfig(r=4, init_lora_weights=False,
                                                                target_modules=targets))
    with torch.no_grad():  # a trained / resized vocabulary: the base embedding and output layer differ
        base = theirs.get_base_model()
        base.model.embed_tokens.weight.add_(torch.randn_like(base.model.embed_tokens.weight))
        if "embed_tokens" not in targets:  # peft then saves the output layer too
            base.lm_head.weight.add_(torch.randn_like(base.lm_head.weight))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path, save_embedding_layers=True)
    keys = {k for k in load_file(tmp_path / "adapter_model.safetensors") if "lora" not in k}
    assert keys and all("embed_tokens" in k or "lm_head" in k for k in keys)
    ours = PeftModel.from_pretrained(llama.model(), tmp_path)
    torch.testing.assert_close(llama.run(ours), llama.run(theirs), atol=1e-5, rtol=0)


# -- 3. a failed load leaves the model as it was ----------------------------------------------------------


def _bad_seq_cls_folder(family, folder):
    get_peft_model(family.model(), LoraConfig(task_type="SEQ_CLS", r=4)).save_pretrained(folder)
    path = folder / "adapter_model.safetensors"
    state = load_file(path)
    key = next(k for k in sorted(state) if k.endswith("lora_A.weight"))
    state[key] = torch.zeros(5, state[key].shape[1])
    save_file(state, path)


def _everything(model):
    """Module objects by path, requires_grad flags, training modes."""
    return ([(n, m) for n, m in model.named_modules()], {n: p.requires_grad for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()})


def _assert_same(model, before):
    after = _everything(model)
    assert [n for n, _ in after[0]] == [n for n, _ in before[0]]
    assert all(a is b for (_, a), (_, b) in zip(after[0], before[0]))
    assert after[1] == before[1] and after[2] == before[2]


def test_failed_from_pretrained_leaves_the_head_and_the_config_as_they_were(tmp_path):
    family = FAMILY["bert"]
    _bad_seq_cls_folder(family, tmp_path)
    base = family.model().train()
    head = base.classifier
    before = _everything(base)
    config = LoraConfig(task_type="SEQ_CLS", r=4)
    config_before = copy.deepcopy(vars(config))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        PeftModel.from_pretrained(base, tmp_path, config=config)
    assert base.classifier is head and type(head) is torch.nn.Linear
    _assert_same(base, before)
    assert vars(config) == config_before


def test_failed_load_adapter_leaves_the_peft_model_as_it_was(tmp_path):
    family = FAMILY["bert"]
    _bad_seq_cls_folder(family, tmp_path)
    model = get_peft_model(family.model(), LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    model.add_adapter("extra", LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["key"]))
    model.train()
    before = _everything(model)
    configs = {n: copy.deepcopy(vars(c)) for n, c in model.peft_config.items()}
    active = list(model.active_adapters)
    config = LoraConfig(task_type="SEQ_CLS", r=4)
    config_before = copy.deepcopy(vars(config))
    for name in ("broken", "extra"):  # a new adapter, and an existing one taking the file's weights
        with pytest.raises(CheckpointError):
            model.load_adapter(tmp_path, adapter_name=name, is_trainable=True, peft_config=config)
        _assert_same(model, before)
        assert {n: vars(c) for n, c in model.peft_config.items()} == configs
        assert model.active_adapters == active and vars(config) == config_before


# -- 4. save_pretrained(selected_adapters=...) ----------------------------------------------------------


def test_unknown_selected_adapter_writes_nothing(llama, tmp_path):
    model = _lora(0, llama, 8)
    model.add_adapter("other", LoraConfig(r=2))
    folder = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        model.save_pretrained(folder, selected_adapters=["default", "other", "nope"])
    msg = str(err.value)
    assert "nope" in msg and "default" in msg and "other" in msg
    assert not folder.exists()


def test_selected_adapters_as_a_string_is_one_name(llama, tmp_path):
    model = _lora(0, llama, 8)
    model.add_adapter("other", LoraConfig(r=2))
    model.save_pretrained(tmp_path, selected_adapters="other")
    assert sorted(os.listdir(tmp_path)) == ["README.md", "other"]
    assert sorted(os.listdir(tmp_path / "other")) == FILES
    with pytest.raises(ValueError, match="'oth'"):
        model.save_pretrained(tmp_path / "x", selected_adapters="oth")
    assert not (tmp_path / "x").exists()


def test_failed_load_on_a_diffusers_model_reports_the_file_error_and_undoes(tmp_path):
    """A load that fails after the adapter layers are in place is undone; diffusers' read-only config mapping
    (FrozenDict) is left alone by the undo, so the error the user sees is the file's."""
    from peftkit import tiny_models

    torch.manual_seed(0)
    get_peft_model(tiny_models.unet(), LoraConfig(r=2, target_modules=["to_q"])).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 4  # the file's factors have rank 2: a shape error once the layers are built
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    fresh = tiny_models.unet()
    with untouched(fresh), pytest.raises(CheckpointError, match=r"shape mismatch for .*to_q\.lora_A\.weight"):
        PeftModel.from_pretrained(fresh, tmp_path)
