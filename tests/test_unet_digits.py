"""The pre-trained diffusion base ``unet-tiny-digits`` (a handful of steps at 8 px on a few images: never the real
build), the prompt encoder saved with it, and the class filter of the image sources."""

from __future__ import annotations

import json
import os

import pytest
import torch

from peftkit.train import diffusion_eval
from peftkit.train import unet_digits as U
from peftkit.train.data import DataError
from peftkit.train.diffusion import DiffusionTask, load_unet, prompt_for
from peftkit.train.diffusion_models import PromptEncoder, has_prompt_encoder
from peftkit.train.images import digits, load_images, split_source
from peftkit.train.models import BUILTIN

TINY = U.UNetDigitsPretraining(steps=3, batch_size=4, check_samples=2, check_steps=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("cache")
    os.environ["PEFTKIT_CACHE"] = str(cache)
    try:
        folder = U.unet_tiny_digits_dir(TINY)
    finally:
        del os.environ["PEFTKIT_CACHE"]
    return folder


def test_the_class_filter_keeps_the_named_classes_and_all_names():
    assert split_source("builtin:digits/train?classes=0-2,7") == ("builtin:digits/train", [0, 1, 2, 7])
    assert split_source("builtin:digits/train") == ("builtin:digits/train", None)
    x, y, names = load_images("builtin:digits/test?classes=5-9")
    _, y_all = digits("test")
    assert names == [str(i) for i in range(10)] and set(y) == {5, 6, 7, 8, 9}
    assert len(y) == int((y_all >= 5).sum()) == x.shape[0]
    assert load_images("builtin:digits/test?classes=5-9", 7)[1] == y[:7]  # data.*_rows: the first of the kept
    for bad, message in (("?classes=", "expected a class filter"), ("?class=1", "expected a class filter"),
                         ("?classes=a-b", "expected a class filter"), ("?classes=4-2", "names no class"),
                         ("?classes=3,12", r"names \[12\]")):
        with pytest.raises(DataError, match=message):
            load_images("builtin:digits/train" + bad)


def test_pretraining_is_deterministic_and_trains_every_parameter(built):
    torch.set_num_threads(1)
    a, enc_a, rec_a = U.pretrain_unet_digits(TINY)  # again, as the cached build was made
    b = load_unet(built)
    start = U.unet_tiny(8, 1, 32)
    sa, sb, s0 = a.state_dict(), b.state_dict(), start.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sum(not torch.equal(sa[k], s0[k]) for k in sa) == len(sa)  # all of it trains (no adapter)
    record = json.load(open(os.path.join(built, "peftkit_pretrain.json")))
    assert rec_a["sample_check"] == record["sample_check"] and rec_a["final_loss"] == record["final_loss"]
    _, y = digits("train")
    assert rec_a["pretrain_images"] == int((y <= 4).sum())  # the train split's 0-4s; the test split untouched
    assert rec_a["prompts"] == [prompt_for(str(i)) for i in range(10)] + ["a photo of a digit"]
    assert enc_a.length == TINY.prompt_length and enc_a.ids(["a photo of the digit nine"]).eq(1).sum() == 0  # no [UNK]
    assert TINY.key() != U.UNET_DIGITS_PRETRAINING.key() and len(TINY.key()) == 12


def test_the_build_is_cached_with_its_record_and_prompt_encoder(built, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", os.path.dirname(built))
    assert os.path.basename(built) == f"unet-tiny-digits-{TINY.key()}" and U.is_built(U.unet_tiny_digits_path(TINY))
    record = json.load(open(os.path.join(built, "peftkit_pretrain.json")))
    assert record["key"] == TINY.key() and record["settings"]["classes"] == [0, 1, 2, 3, 4]
    assert set(record["sample_check"]["accuracy"]) == {str(i) for i in range(10)}
    assert sum(record["sample_check"]["uncond_prompt_reads_as"].values()) == TINY.check_samples
    before = os.path.getmtime(os.path.join(built, "unet", "config.json"))
    assert U.unet_tiny_digits_dir(TINY) == built  # reused, not rebuilt
    assert os.path.getmtime(os.path.join(built, "unet", "config.json")) == before
    assert not [p for p in os.listdir(os.path.dirname(built)) if ".tmp-" in p]
    assert has_prompt_encoder(built) and "unet-tiny-digits" in BUILTIN
    assert load_unet(built).config.sample_size == 8


def test_the_saved_prompt_encoder_reads_as_in_pretraining_and_adds_new_words(built):
    prompts = U.base_prompts(TINY)
    trained = PromptEncoder(prompts, 32, length=TINY.prompt_length)
    saved = PromptEncoder.saved(built, [prompts[3]])
    assert torch.equal(saved(prompts), trained(prompts))  # same vocabulary, length and weights
    grown = PromptEncoder.saved(built, ["a photo of sks digit"])
    again = PromptEncoder.saved(built, ["a photo of sks digit"])
    assert grown.ids(["a photo of sks digit"]).eq(1).sum() == 0  # "sks": an added word, not [UNK]
    assert torch.equal(grown(["a photo of sks digit"]), again(["a photo of sks digit"]))  # seed-0 row
    assert torch.equal(grown(prompts), trained(prompts))  # the known prompts read the same
    row = grown.model.get_input_embeddings().weight[-1]
    assert torch.allclose(row, torch.randn((1, 32), generator=torch.Generator().manual_seed(0))[0] * 0.02)
    with pytest.raises(DataError, match="reads at most 9 words"):
        PromptEncoder.saved(built, ["one two three four five six seven eight nine ten"])


def test_a_diffusion_task_on_the_base_uses_its_encoder_and_scores_the_filtered_classes(built, tmp_path, monkeypatch):
    from peftkit.train.recipe import load_recipe

    monkeypatch.setattr(diffusion_eval, "MEASURE_SAMPLES", 5)
    monkeypatch.setattr(DiffusionTask, "sample_steps", 2)
    (tmp_path / "r.yaml").write_text(
        f"model: {built}\ntask: diffusion\nmethod: lora\npeft: {{r: 2, target_modules: [to_k]}}\n"
        "data: {train: 'builtin:digits/train?classes=5-9', test: 'builtin:digits/test?classes=5-9', image_size: 8,"
        " train_rows: 20, test_rows: 10}\n")
    task = DiffusionTask(load_recipe(str(tmp_path / "r.yaml")))
    task.load_data()
    model = task.load_model()
    assert task.base_folder == built and len(task.labels) == 10 and set(task.train_y) <= {5, 6, 7, 8, 9}
    assert torch.equal(task.cond, PromptEncoder.saved(built, [])(task.prompts))
    seen = []

    def spy(images, classes):
        seen.append(classes)
        return 0.0

    monkeypatch.setattr(diffusion_eval, "sample_accuracy", spy)
    from peftkit.model import get_peft_model
    from peftkit.methods.lora import LoraConfig

    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["to_k"]))
    diffusion_eval.sample_scores(task, peft)
    present = sorted(set(task.train_y))
    assert seen[0] == present * 1 and seen[0] == seen[1]  # one sample per present class: the filtered prompts only
