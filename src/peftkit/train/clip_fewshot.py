"""Few-shot image classification with CLIP (task ``clip_fewshot``): the class names are the classifier.

Each class name goes into a prompt (``data.class_template``, "a photo of a {}."), CLIP's text tower turns the
prompts into one embedding per class, and an image's logits are ``logit_scale * cos(image, class)``, as in
CLIP's zero-shot classification (Radford et al. 2021) and its few-shot adapters (CoOp, CoCoOp,
CLIP-Adapter, Tip-Adapter). The training set is ``data.shots`` images per class (None: all), drawn by a
seeded permutation; the loss is cross-entropy over the classes. A method that supplies its own classifier
(``classify(pixel_values, class_names, tokenizer=, template=)`` on the adapted model, e.g. CoCoOp's image-conditioned prompts) is
used as it is; otherwise the plain ``CLIPModel`` forward gives ``logits_per_image``, so LoRA, CLIP-Adapter
and any method acting inside the towers train through it.

Images: the image tasks' built-in sources (``builtin:digits/train``, ``builtin:fashion_mnist/test`` ...),
normalised with CLIP's mean and std. Models: ``clip-tiny`` (a 2 x 2-layer, 64-wide CLIP built from a config
with fixed random weights, using the MiniLM's WordPiece tokenizer: no download) or any local
``transformers`` CLIP folder with its tokenizer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import DataError
from .models import minilm_dir, resolve_model
from .tasks import _quiet_transformers, register_task
from .vision import ImageClassification

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def few_shot_indices(labels: list[int], shots: int | None, seed: int) -> list[int]:
    """The first ``shots`` examples of each class in a seeded permutation (sorted); all when None."""
    if shots is None:
        return list(range(len(labels)))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    taken: dict[int, int] = {}
    keep = []
    for i in perm:
        if taken.get(labels[i], 0) < shots:
            taken[labels[i]] = taken.get(labels[i], 0) + 1
            keep.append(i)
    return sorted(keep)


def clip_tiny(vocab_size: int, eos_token_id: int, pad_token_id: int, image_size: int) -> nn.Module:
    """A small random CLIP; the weights are a fixed function of its shape (seed 0)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, bos_token_id=eos_token_id),
        vision_config=dict(image_size=image_size, patch_size=4, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CLIPModel(config)


@register_task("clip_fewshot")
class ClipFewShot(ImageClassification):
    """Few-shot classification by CLIP similarity to class-name prompts; metric: test accuracy. Batches,
    loss and evaluation are image classification's; the data, the model and the logits are its own."""

    def load_data(self) -> None:
        d = self.recipe.data
        if "{}" not in d.class_template:
            raise DataError(f"data.class_template: {d.class_template!r} has no {{}} for the class name")
        super().load_data()
        keep = few_shot_indices(self.train_y, d.shots, self.recipe.train.seed)
        self.train_x, self.train_y = self.train_x[keep], [self.train_y[i] for i in keep]
        self.n_train = len(self.train_y)
        if d.shots is not None:
            self.notes.append(f"clip_fewshot: {d.shots} shots x {len(self.labels)} classes = {self.n_train} "
                              "training images")

    def load_model(self) -> nn.Module:
        from transformers import AutoTokenizer

        r = self.recipe
        _quiet_transformers()
        if r.model == "clip-tiny":
            self.tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
            self.image_size = r.data.image_size or 32
            model = clip_tiny(self.tokenizer.vocab_size, self.tokenizer.sep_token_id, self.tokenizer.pad_token_id,
                              self.image_size)
        else:
            from transformers import CLIPModel

            folder = resolve_model(r.model)
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            model = CLIPModel.from_pretrained(folder)
            self.image_size = r.data.image_size or model.config.vision_config.image_size
        prompts = [r.data.class_template.format(name) for name in self.labels]
        enc = self.tokenizer(prompts, padding=True, return_tensors="pt")
        self.prompt_ids, self.prompt_mask = enc["input_ids"], enc["attention_mask"]
        return model

    def _inputs(self, images: Tensor) -> Tensor:
        x = images.float().div(255).unsqueeze(1)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = x.clamp(0, 1).expand(-1, 3, -1, -1)
        mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    def logits(self, model: nn.Module, pixel_values: Tensor) -> Tensor:
        """(batch, classes): the method's own classifier when it has one, else CLIP's ``logits_per_image``."""
        classify = _method_classifier(model)
        if classify is not None:
            return classify(pixel_values, self.labels, tokenizer=self.tokenizer,
                            template=self.recipe.data.class_template)
        ids, mask = self.prompt_ids.to(pixel_values.device), self.prompt_mask.to(pixel_values.device)
        return model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values).logits_per_image


def _method_classifier(model: nn.Module) -> Any:
    """``model.classify`` when the adapted model (or its DDP wrapper's module) has one, else None."""
    inner = getattr(model, "module", model)
    try:
        classify = getattr(inner, "classify")
    except AttributeError:
        return None
    return classify if callable(classify) else None
