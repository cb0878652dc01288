"""Text-to-image diffusion LoRA for ``peftkit train`` (task ``diffusion``).

The adapted model is a diffusers ``UNet2DConditionModel`` trained as a DDPM noise predictor: for a clean
image ``x0``, noise ``eps`` and a timestep ``t`` (both drawn from torch's global RNG, which the trainer seeds
and checkpoints, so runs are reproducible and resume exactly), the loss is ``MSE(unet(x_t, t, text), eps)``
with ``x_t`` from a ``DDPMScheduler`` (1,000 steps, cosine schedule). The metric is ``test_loss``: the same
MSE on the held-out images at timesteps and noise fixed by a private generator (lower is better).

Images come from the image sources of :mod:`peftkit.train.vision` (``builtin:digits/train`` ...), resized
to ``data.image_size`` and scaled to [-1, 1]; each label becomes a prompt ("a photo of the digit three").

Text conditioning: a frozen 2-layer ``CLIPTextModel`` built from a config, with fixed random weights (seed 0)
and a word-level tokenizer (the ``tokenizers`` library) over the prompts' words; nothing is downloaded. A
random frozen encoder is enough here: it maps each prompt to a fixed, distinct sequence of vectors that the
UNet's cross-attention learns to read. The prompts are encoded once; a batch picks its rows.

Models (``model``): ``unet-tiny``, a small UNet with cross-attention built from a config with fixed random
weights (seed 0), or a local folder holding a ``UNet2DConditionModel`` (or a pipeline folder with ``unet/``).

After training, :meth:`DiffusionTask.finish` renders a grid of DDIM samples (one column per label) with the
adapter on and off: ``samples_adapter_on.png`` and ``samples_adapter_off.png`` in the run folder.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import DataError
from .models import ModelError
from .images import load_images, to_model_input
from .task import Task, register_task

SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
EVAL_SEED = 1234  # noise and timesteps of the test loss


def prompt_for(label: str) -> str:
    """The text prompt of a class name: "3" -> "a photo of the digit three", "Ankle boot" -> "a photo of a
    ankle boot"."""
    if label.isdigit() and int(label) < len(NUMBER_WORDS):
        return f"a photo of the digit {NUMBER_WORDS[int(label)]}"
    return f"a photo of a {label.lower().replace('/', ' or ')}"


def unet_tiny(image_size: int = 16, channels: int = 1, cross_attention_dim: int = 32) -> nn.Module:
    """A 200k-parameter UNet2DConditionModel (two levels, cross-attention at the outer one), seed-0 weights."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=image_size, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
            attention_head_dim=8, norm_num_groups=8)


def load_unet(name: str) -> nn.Module:
    """A UNet2DConditionModel from a folder (its own, or a pipeline folder's ``unet/``)."""
    from diffusers import UNet2DConditionModel

    if not os.path.isdir(name):
        raise ModelError(f"model: {name!r} is neither unet-tiny nor a folder holding a UNet2DConditionModel")
    sub = "unet" if os.path.isfile(os.path.join(name, "unet", "config.json")) else None
    return UNet2DConditionModel.from_pretrained(name, subfolder=sub)


class PromptEncoder:
    """A frozen tiny CLIP text encoder over a word-level vocabulary of ``prompts``' words."""

    def __init__(self, prompts: list[str], hidden_size: int) -> None:
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel
        from tokenizers.pre_tokenizers import Whitespace
        from transformers import CLIPTextConfig, CLIPTextModel

        words = sorted({w for p in prompts for w in p.split()})
        vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
        self.tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
        self.tokenizer.pre_tokenizer = Whitespace()
        self.length = max(len(p.split()) for p in prompts) + 1  # + [EOS]
        config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=self.length,
                                pad_token_id=0, eos_token_id=2, bos_token_id=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = CLIPTextModel(config).eval().requires_grad_(False)

    def ids(self, prompts: list[str]) -> Tensor:
        rows = []
        for p in prompts:
            ids = self.tokenizer.encode(p).ids + [2]
            rows.append(ids + [0] * (self.length - len(ids)))
        return torch.tensor(rows)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Tensor:
        """(len(prompts), length, hidden_size) last hidden states."""
        return self.model(input_ids=self.ids(prompts)).last_hidden_state


@torch.no_grad()
def sample_images(unet: nn.Module, cond: Tensor, shape: tuple[int, ...], *, steps: int = 20, seed: int = 0,
                  scheduler_config: dict[str, Any] | None = None) -> Tensor:
    """DDIM samples (eta 0, ``steps`` steps) in [-1, 1], one per row of ``cond``; the start noise comes
    from a generator seeded with ``seed``, so equal UNets give equal samples."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**(scheduler_config or SCHEDULER))
    scheduler.set_timesteps(steps)
    device = next(unet.parameters()).device
    x = torch.randn((len(cond), *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    cond = cond.to(device)
    was_training = unet.training
    unet.eval()
    for t in scheduler.timesteps:
        eps = unet(x, t.to(device), encoder_hidden_states=cond).sample
        x = scheduler.step(eps, t, x).prev_sample
    unet.train(was_training)
    return x.clamp(-1, 1).cpu()


def save_grid(images: Tensor, columns: int, path: str) -> tuple[int, int]:
    """Save (N, C, H, W) images in [-1, 1] as one PNG, ``columns`` per row; returns (width, height)."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = -(-n // columns)
    grid = torch.full((c, rows * h, columns * w), -1.0)
    for i, img in enumerate(images):
        r, k = divmod(i, columns)
        grid[:, r * h : (r + 1) * h, k * w : (k + 1) * w] = img
    pixels = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    array = pixels[0].numpy() if c == 1 else pixels[:3].permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)
    return columns * w, rows * h


@register_task("diffusion")
class DiffusionTask(Task):
    """DDPM noise-prediction training of a text-conditioned UNet; metric: test_loss (denoising MSE)."""

    main_metric = "test_loss"
    higher_is_better = False
    labels: list[str] | None = None
    sample_steps = 20  # DDIM steps of the sample grids
    samples_per_label = 4  # grid rows
    sample_seed = 0

    def load_data(self) -> None:
        d = self.recipe.data
        self.train_x, self.train_y, names = load_images(d.train, d.train_rows)
        if self.labels is not None and self.labels != names:
            raise DataError(f"{d.train}: its classes {names} are not the run's labels {self.labels}")
        self.labels = names
        self.test_x, self.test_y = None, []
        if d.test:
            self.test_x, self.test_y, test_names = load_images(d.test, d.test_rows)
            if test_names != names:
                raise DataError(f"{d.test}: its classes {test_names} differ from {d.train}'s {names}")
        self.n_train = len(self.train_y)
        self._eval_cache: tuple[Tensor, Tensor, Tensor] | None = None

    def load_model(self) -> nn.Module:
        from diffusers import DDPMScheduler

        r = self.recipe
        unet = unet_tiny(r.data.image_size or 16) if r.model == "unet-tiny" else load_unet(r.model)
        self.image_size = r.data.image_size or int(unet.config.sample_size)
        self.channels = int(unet.config.in_channels)
        self.scheduler = DDPMScheduler(**SCHEDULER)
        self.prompts = [prompt_for(name) for name in self.labels]
        self.encoder = PromptEncoder(self.prompts, int(unet.config.cross_attention_dim))
        self.cond = self.encoder(self.prompts)  # (num_labels, length, dim), fixed for the run
        return unet

    def _images(self, images: Tensor) -> Tensor:
        return to_model_input(images, self.image_size, self.channels, imagenet=False)

    def _noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def batch(self, indices: list[int]) -> dict[str, Any]:
        x0 = self._images(self.train_x[indices])
        noise = torch.randn(x0.shape)  # torch's global RNG: seeded and checkpointed by the trainer
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(indices),))
        return {"sample": self._noisy(x0, noise, t), "timestep": t, "noise": noise,
                "encoder_hidden_states": self.cond[[self.train_y[i] for i in indices]]}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        pred = model(batch["sample"], batch["timestep"], encoder_hidden_states=batch["encoder_hidden_states"]).sample
        return F.mse_loss(pred.float(), batch["noise"].float())

    def _eval_set(self) -> tuple[Tensor, Tensor, Tensor]:
        """Noisy test images, their noise and timesteps, drawn once from a private generator."""
        if self._eval_cache is None:
            g = torch.Generator().manual_seed(EVAL_SEED)
            x0 = self._images(self.test_x)
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(x0),), generator=g)
            self._eval_cache = (self._noisy(x0, noise, t), noise, t)
        return self._eval_cache

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.test_y:
            return {}
        was_training = model.training
        model.eval()
        noisy, noise, t = self._eval_set()
        bs, total = self.recipe.train.eval_batch_size, 0.0
        for s in range(0, len(t), bs):
            batch = self.move({"sample": noisy[s : s + bs], "timestep": t[s : s + bs], "noise": noise[s : s + bs],
                               "encoder_hidden_states": self.cond[self.test_y[s : s + bs]]})
            total += float(self.loss(model, batch)) * len(batch["timestep"])
        model.train(was_training)
        return {"test_loss": total / len(t)}

    def samples(self, model: nn.Module) -> Tensor:
        """A grid's worth of samples: ``samples_per_label`` rows, one column per label."""
        cond = self.cond.repeat(self.samples_per_label, 1, 1)
        return sample_images(model, cond, (self.channels, self.image_size, self.image_size),
                             steps=self.sample_steps, seed=self.sample_seed)

    def finish(self, model: nn.Module, run_dir: str) -> None:
        """Write ``samples_adapter_on.png`` and ``samples_adapter_off.png`` (same seed, same noise)."""
        save_grid(self.samples(model), len(self.labels), os.path.join(run_dir, "samples_adapter_on.png"))
        with model.disable_adapter():
            off = self.samples(model)
        save_grid(off, len(self.labels), os.path.join(run_dir, "samples_adapter_off.png"))

    def run_info(self) -> dict[str, Any]:
        return {"labels": self.labels}

    def restore_info(self, info: dict[str, Any]) -> None:
        self.labels = list(info["labels"])
