"""The model families every method is tested on (DESIGN.md section 4): tiny models built from configs,
plus the real pretrained MiniLM (the builders live in :mod:`peftkit.tiny_models`, shared with the benchmark).
Each family knows how to build its model, make inputs and read an output."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from peftkit import PeftModel, tiny_models

V = tiny_models.VOCAB  # vocabulary size of the tiny language models


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Any]]
    output: Callable[[Any], torch.Tensor]
    targets: list[str] | None = None  # None: the role table's default
    task_type: str | None = None
    # peft_type -> inputs only that method reads, which the plain model rejects: given to a PeftModel holding an
    # adapter of that type (enabled or not: the method takes them out of the call either way)
    adapter_inputs: dict[str, Callable[[], dict[str, Any]]] = dataclasses.field(default_factory=dict)
    # modules the output does not depend on: trained parameters under them may go without a gradient
    unreached: tuple[str, ...] = ()

    def reaches(self, name: str) -> bool:
        """Whether the output may depend on parameter ``name`` (a ``named_parameters()`` name of any wrapping)."""
        return not any(f".{path}." in f".{name}" for path in self.unreached)

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()

    def run(self, model: nn.Module) -> torch.Tensor:
        torch.manual_seed(1)
        inputs = self.inputs()
        types = {c.peft_type for c in model.peft_config.values()} if isinstance(model, PeftModel) else set()
        for peft_type in sorted(types & self.adapter_inputs.keys()):
            inputs.update(self.adapter_inputs[peft_type]())
        return self.output(model(**inputs))

    def base_output(self) -> torch.Tensor:
        """``run`` on the unadapted model, computed once per process (the contract compares every case with it)."""
        if self.name not in _BASE_OUTPUTS:
            with torch.no_grad():
                _BASE_OUTPUTS[self.name] = self.run(self.model())
        return _BASE_OUTPUTS[self.name]

    def module_types(self) -> dict[str, type]:
        """Each submodule's path -> its type, read once per process."""
        if self.name not in _MODULE_TYPES:
            _MODULE_TYPES[self.name] = {n: type(m) for n, m in self.model().named_modules()}
        return _MODULE_TYPES[self.name]


_BASE_OUTPUTS: dict[str, torch.Tensor] = {}
_MODULE_TYPES: dict[str, dict[str, type]] = {}


IMAGE_PROMPT = torch.linspace(-2.0, 2.0, 32).reshape(1, 1, 32)  # the unet family's image embedding (B, N, D)
IP_ARG = "ip_adapter_image_embeds"  # diffusers' image prompt argument
SD3_IMAGE_PROMPT = torch.linspace(-2.0, 2.0, 2 * 3 * 32).reshape(2, 3, 32)  # the sd3 family's image features (B, L, D)


def _ids(shape: tuple[int, ...] = (2, 7)) -> torch.Tensor:
    return torch.randint(0, V, shape)


ConvNet = tiny_models.ConvNet  # a small image classifier with Conv2d layers (LoRA on convolutions)


@torch.no_grad()
def nudge_trainable(model: nn.Module, scale: float) -> None:
    """Add ``scale`` x standard normal noise to every trainable parameter (zero-init parts would hide bugs)."""
    for p in model.parameters():
        if p.requires_grad:
            p.add_(scale * torch.randn_like(p))


minilm_folder = tiny_models.minilm_dir

# all-MiniLM-L6-v2's shape (BertConfig defaults otherwise) with random weights: file-size and memory checks
MINILM_SIZE = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536, max_position_embeddings=512, num_labels=2)


def minilm_size_bert() -> nn.Module:
    """A randomly initialised (seed 0) BERT classifier of all-MiniLM-L6-v2's size, in eval mode."""
    torch.manual_seed(0)
    return tiny_models.bert(**MINILM_SIZE).eval()


FAMILIES = [
    Family("bert", tiny_models.bert, lambda: {"input_ids": _ids()}, lambda o: o.logits, task_type="SEQ_CLS"),
    Family("roberta", tiny_models.roberta, lambda: {"input_ids": _ids() + 2}, lambda o: o.logits, task_type="SEQ_CLS"),
    Family("gpt2", tiny_models.gpt2, lambda: {"input_ids": _ids()}, lambda o: o.logits),
    Family("llama", tiny_models.llama, lambda: {"input_ids": _ids()}, lambda o: o.logits),
    Family("t5", tiny_models.t5, lambda: {"input_ids": _ids(), "decoder_input_ids": _ids((2, 5))}, lambda o: o.logits),
    Family("vit", tiny_models.vit, lambda: {"pixel_values": torch.randn(2, 3, 32, 32)}, lambda o: o.logits),
    Family("convnet", ConvNet, lambda: {"pixel_values": torch.randn(2, 3, 12, 12)}, lambda o: o,
           targets=["conv1", "conv2"]),
    # The output joins the logits and every text position: the tiny text tower keeps CLIP's default
    # eos_token_id (outside its vocabulary), so it pools token 0, which the causal mask lets attend only to
    # itself; through the logits alone the text queries and keys could not change anything.
    Family("clip", tiny_models.clip, lambda: {"input_ids": _ids(), "pixel_values": torch.randn(2, 3, 32, 32)},
           lambda o: torch.cat([o.logits_per_image.flatten(), o.text_model_output.last_hidden_state.flatten()])),
    # added_cond_kwargs: diffusers' image prompt, which IP-Adapter reads and the plain UNet ignores (fixed values:
    # no draw from the seeded RNG, so the other inputs are as before)
    Family("unet", tiny_models.unet, lambda: {"sample": torch.randn(1, 4, 8, 8), "timestep": 10,
                                               "encoder_hidden_states": torch.randn(1, 5, 16),
                                               "added_cond_kwargs": {"image_embeds": [IMAGE_PROMPT]}}, lambda o: o.sample),
    # SD3's MMDiT. Its image prompt goes in joint_attention_kwargs, which the plain transformer reads itself (through
    # an image_proj it lacks): it goes to IP-Adapter's models only
    Family("sd3", tiny_models.sd3, lambda: {"hidden_states": torch.randn(2, 4, 8, 8),
                                            "timestep": torch.tensor([10.0, 500.0]),
                                            "encoder_hidden_states": torch.randn(2, 5, 16),
                                            "pooled_projections": torch.randn(2, 8)}, lambda o: o.sample,
           adapter_inputs={"IP_ADAPTER": lambda: {"joint_attention_kwargs": {IP_ARG: SD3_IMAGE_PROMPT}}},
           # the last block is context-pre-only: its text stream ends at the joint attention, so its text queries
           # reach nothing
           unreached=("transformer_blocks.1.attn.add_q_proj",)),
    Family("minilm", tiny_models.minilm, lambda: {"input_ids": torch.randint(1000, 20000, (2, 12))}, lambda o: o.logits,
           task_type="SEQ_CLS"),
]
FAMILY = {f.name: f for f in FAMILIES}


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """The block must leave ``model`` as it was: the same module types in the same places and every tensor of its
    state equal (for the refusals: ``with untouched(model), pytest.raises(...): get_peft_model(...)``)."""
    modules = [(name, type(m)) for name, m in model.named_modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    yield
    assert [(name, type(m)) for name, m in model.named_modules()] == modules, "the model's modules changed"
    after = model.state_dict()
    assert after.keys() == before.keys(), "the model's state keys changed"
    changed = [k for k, v in after.items() if not torch.equal(before[k], v)]
    assert not changed, f"tensors changed: {changed[:5]}"
