"""`peftkit train`: IP-Adapter's image-prompt dropout (``ip_adapter.image_dropout``), GRPO's training reward in
metrics.jsonl, and ``peftkit merge`` of a diffusion run that adapted the text encoder too."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from peftkit.train.recipe import RecipeError, load_recipe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# -- IP-Adapter: image-prompt dropout ---------------------------------------------------------------------------------
def _ip_recipe(root: Path, **ip_adapter) -> str:
    recipe = yaml.safe_load((CONFIGS / "digits_ip_adapter.yaml").read_text())
    recipe["model"] = "unet-tiny"  # random weights: no pre-training in tests
    recipe["data"].update(image_size=8, train_rows=200, test_rows=20)
    recipe["train"].update(max_steps=2, log_every=1, save_every=0)
    recipe["output_dir"] = str(root / "run")
    if ip_adapter:
        recipe["ip_adapter"] = ip_adapter
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return str(root / "recipe.yaml")


@pytest.fixture
def ip_task(monkeypatch, tmp_path):
    """A loaded IP-Adapter task (a random tiny CLIP as the image encoder); ``make(p)`` sets the dropout."""
    from peftkit.train import ip_adapter_task as T
    from peftkit.train.tasks import TASKS

    monkeypatch.setattr(T.IPAdapterDiffusionTask, "image_encoder", "clip-tiny")
    task = TASKS["diffusion"](load_recipe(_ip_recipe(tmp_path)))
    assert type(task) is T.IPAdapterDiffusionTask
    task.load_data()
    task.load_model()

    def make(p: float):
        task.recipe.ip_adapter.image_dropout = p
        return task

    return make


def _batch(task, seed: int, rows: int = 200):
    torch.manual_seed(seed)
    return task.batch(list(range(rows)))


def test_image_dropout_zeroes_whole_image_prompts_with_the_trainers_rng(ip_task):
    task = ip_task(0.0)
    kept = _batch(task, 0)
    assert (kept["image_embeds"].abs().sum(1) > 0).all()  # p = 0: no row dropped
    after_kept = torch.get_rng_state()
    task = ip_task(1 - 1e-9)
    gone = _batch(task, 0)
    assert torch.equal(gone["image_embeds"], torch.zeros_like(kept["image_embeds"]))  # p ~ 1: every row dropped
    task = ip_task(0.5)
    half = _batch(task, 0)
    again = _batch(task, 0)
    for k in ("sample", "timestep", "noise", "image_embeds"):
        assert torch.equal(half[k], again[k]), k  # one seed, one batch
    assert not torch.equal(half["image_embeds"], _batch(task, 1)["image_embeds"])
    dropped = half["image_embeds"].abs().sum(1) == 0
    assert 60 <= int(dropped.sum()) <= 140  # Binomial(200, 0.5)
    # the dropout is drawn after the rest of the batch: noise, timesteps and the kept prompts are p = 0's
    for k in ("sample", "timestep", "noise"):
        assert torch.equal(half[k], kept[k])
    assert torch.equal(half["image_embeds"][~dropped], kept["image_embeds"][~dropped])
    # p = 0 draws nothing: the RNG moves exactly as before the field existed (the shipped recipe is unchanged)
    torch.manual_seed(0)
    task.batch(list(range(200)))
    assert not torch.equal(torch.get_rng_state(), after_kept)
    _batch(ip_task(0.0), 0)
    assert torch.equal(torch.get_rng_state(), after_kept)


def test_image_dropout_recipe_field(tmp_path):
    assert load_recipe(_ip_recipe(tmp_path / "d")).ip_adapter.image_dropout == 0.0  # the shipped recipe: none
    assert yaml.safe_load((CONFIGS / "digits_ip_adapter.yaml").read_text())["ip_adapter"] == {"image_dropout": 0.0}
    recipe = yaml.safe_load((CONFIGS / "digits_ip_adapter.yaml").read_text())
    recipe.pop("ip_adapter")
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(recipe))
    assert load_recipe(str(tmp_path / "plain.yaml")).ip_adapter.image_dropout == 0.05  # the paper's default
    path = _ip_recipe(tmp_path / "e")
    for value in ("1.0", "1.5", "-0.1", ".nan"):
        with pytest.raises(RecipeError, match=r"^ip_adapter\.image_dropout: expected a probability in \[0, 1\)"):
            load_recipe(path, [f"ip_adapter.image_dropout={value}"])
    with pytest.raises(RecipeError, match=r"^ip_adapter\.image_dropout: expected a number, got 'often'"):
        load_recipe(path, ["ip_adapter.image_dropout=often"])
    with pytest.raises(RecipeError, match="^ip_adapter: read by task diffusion with method ip_adapter; got task "
                                          "diffusion, method lora"):
        load_recipe(path, ["method=lora", "peft={}", "ip_adapter.image_dropout=0.1"])
    assert load_recipe(path, ["ip_adapter.image_dropout=0.25"]).ip_adapter.image_dropout == 0.25


# -- GRPO: the training reward in metrics.jsonl -----------------------------------------------------------------------
GRPO_TINY = str(CONFIGS / "agnews_grpo_tiny.yaml")
GRPO_FAST = ["train.batch_size=2", "train.save_every=0", "data.test_rows=2", "grpo.max_new_tokens=3",
             "grpo.reward.type=regex", r"grpo.reward.pattern=^\s*[a-m]"]  # about half of random words start a-m


@pytest.fixture
def computed_rewards(monkeypatch):
    """Every reward tensor the GRPO task computes, in order (training steps, then none: evaluation is greedy and
    scores its completions itself)."""
    from peftkit.train.grpo_task import GroupRelativePolicyOptimization as Grpo

    seen: list[torch.Tensor] = []
    original = Grpo.rewards

    def rewards(self, completions, labels):
        out = original(self, completions, labels)
        seen.append(out.clone())
        return out

    monkeypatch.setattr(Grpo, "rewards", rewards)
    return seen


def _train_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_grpo_logs_the_mean_training_reward_of_each_log_window(tmp_path, computed_rewards):
    from peftkit.train import train

    G, accum = 4, 2
    train(load_recipe(GRPO_TINY, [f"output_dir={tmp_path / 'run'}", "train.max_steps=5", "train.log_every=2",
                                  f"train.grad_accum={accum}", *GRPO_FAST]), quiet=True)
    records = _train_records(tmp_path / "run")
    assert [r["step"] for r in records] == [2, 4, 5]
    assert len(computed_rewards) == 5 * accum and all(len(r) == 2 * G for r in computed_rewards)
    every = torch.cat(computed_rewards)
    assert 0 < float(every.mean()) < 1  # a mix of rewards: the check below is not 0 == 0
    for record, (a, b) in zip(records, [(0, 2), (2, 4), (4, 5)]):
        window = torch.cat(computed_rewards[a * accum : b * accum])
        assert record["reward"] == pytest.approx(float(window.mean()), abs=1e-9)
        assert record["reward_std"] == pytest.approx(float(window.view(-1, G).std(1).mean()), abs=1e-6)
        assert record["kl"] >= 0 and all(math.isfinite(record[k]) for k in ("reward", "reward_std", "kl"))


def test_grpo_reward_window_survives_a_resume(tmp_path, computed_rewards):
    import shutil

    from peftkit.train import train

    steps = ["train.max_steps=4", "train.log_every=4", "train.save_every=1", "train.keep_last=3"]
    train(load_recipe(GRPO_TINY, [f"output_dir={tmp_path / 'full'}", *GRPO_FAST, *steps]), quiet=True)
    whole = _train_records(tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000003")  # killed after step 3's checkpoint was lost
    train(load_recipe(GRPO_TINY, [f"output_dir={tmp_path / 'cut'}", *GRPO_FAST, *steps, "resume=true"]), quiet=True)
    resumed = _train_records(tmp_path / "cut")
    assert [r["step"] for r in whole] == [r["step"] for r in resumed] == [4]
    for k in ("loss", "reward", "reward_std", "kl"):  # the window's steps 1-2 came from the checkpoint
        assert resumed[0][k] == pytest.approx(whole[0][k], abs=1e-9), k
    assert 0 < whole[0]["reward"] < 1


# -- peftkit merge: a diffusion run that adapted the text encoder too ------------------------------------------------
@pytest.fixture
def quick_diffusion(monkeypatch):
    from peftkit.train import diffusion_eval
    from peftkit.train.diffusion import DiffusionTask

    monkeypatch.setattr(DiffusionTask, "sample_steps", 2)
    monkeypatch.setattr(DiffusionTask, "samples_per_label", 1)
    monkeypatch.setattr(diffusion_eval, "MEASURE_SAMPLES", 2)


def test_merge_of_a_unet_and_text_encoder_run_reads_back_as_the_adapter_model(tmp_path, quick_diffusion):
    from peftkit.cli import main as cli_main
    from peftkit.train import train
    from peftkit.train.commands import load_trained
    from peftkit.train.tasks import TASKS
    from peftkit.train.text_to_image import TextToImage

    recipe = yaml.safe_load((CONFIGS / "digits_unet_lora.yaml").read_text())
    recipe["model"] = "unet-tiny"
    recipe["data"].update(image_size=8, train_rows=40, test_rows=10)
    recipe["train"].update(max_steps=3, lr=5e-2, log_every=3, save_every=0)
    recipe["diffusion"] = {"adapt": ["unet", "text_encoder"]}
    recipe["peft"]["target_modules"] += ["q_proj", "k_proj", "v_proj", "out_proj"]  # the CLIP text encoder's
    recipe["output_dir"] = str(tmp_path / "run")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    train(load_recipe(str(tmp_path / "recipe.yaml")), quiet=True)
    run, out = tmp_path / "run", tmp_path / "merged"

    assert cli_main(["merge", str(run), "--out", str(out)]) == 0
    for name in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                 "text_encoder/model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name

    adapted, task = load_trained(str(run))
    adapted.eval()
    # the run's own recipe with the merged folder as its model: the task's loader reads both parts back
    again = TASKS["diffusion"](load_recipe(str(run / "config.yaml"), [f"model={out}"]))
    again.restore_info(json.loads((run / "summary.json").read_text()))
    merged = again.load_model().eval()
    assert type(merged) is TextToImage and torch.equal(again.cond, task.cond)  # the same token ids
    g = torch.Generator().manual_seed(3)
    x, t, ids = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([10, 400, 900]), task.cond[[0, 4, 9]]
    with torch.no_grad():
        ours = adapted(x, t, encoder_hidden_states=ids).sample
        text = adapted.get_base_model().text_encoder(input_ids=ids).last_hidden_state
        with adapted.disable_adapter():
            base = adapted(x, t, encoder_hidden_states=ids).sample
            base_text = adapted.get_base_model().text_encoder(input_ids=ids).last_hidden_state
        theirs = merged(x, t, encoder_hidden_states=ids).sample
        their_text = merged.text_encoder(input_ids=ids).last_hidden_state
    assert (ours - base).abs().max() > 1e-3 and (text - base_text).abs().max() > 1e-3  # both parts learned
    torch.testing.assert_close(their_text, text, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # the UNet alone, as diffusers reads a pipeline folder's component
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet").eval()
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=text).sample, ours, atol=1e-5, rtol=0)
