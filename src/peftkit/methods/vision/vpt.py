"""VPT: Visual Prompt Tuning (Jia et al. 2022, arXiv 2203.12119).

p learned prompt tokens P (p x d) are inserted right after [CLS] of a vision transformer:

    shallow:  [x_1, Z_1, E_1] = L_1([x_0, P, E_0]);  [x_i, Z_i, E_i] = L_i([x_{i-1}, Z_{i-1}, E_{i-1}]), i >= 2
    deep:     [x_i, _, E_i]   = L_i([x_{i-1}, P_{i-1}, E_{i-1}]),  i = 1..L
    y = Head(LN(x_L))                                                               ([CLS] at position 0)

(x: [CLS], E: patch tokens, P: prompts; p x d parameters shallow, L x p x d deep.)

i.e. VPT-deep feeds fresh prompts P_{i-1} into every block and discards the previous block's prompt outputs.
Prompts sit after the position embeddings (they have none). The head still reads [CLS] at position 0.
Shapes: hidden states (B, 1 + N, d) become (B, 1 + p + N, d). VPT-deep on ViT-B (L=12, d=768) with
p=50 trains 12 x 50 x 768 = 460,800 parameters.

Init as the paper's code (``vit_prompt/vit.py``): uniform(-v, v) with v = sqrt(6 / (3 * patch^2 + d)), the
Xavier-uniform bound of a patch projection (fan_in = channels x patch x patch, taken from the model's patch
Conv2d; fan_out = d). Dropout on the prompts (``prompt_dropout``) as the paper's code.

How it attaches (two module wrappers, no model surgery):
- the embeddings module (role ``vision_embeddings``: ViT ``embeddings``, CLIP ``vision_model.embeddings``)
  gets P_0 inserted after [CLS] of its output;
- deep: block i (i = 0..L-2, role ``vision_layers``) replaces the prompt slice of its *output* with
  P_{i+1}, the prompts of the next block's input (the blocks are called with extra arguments, so the
  input side cannot be rewritten through the wrapper's single-input fast path). The last block's prompt
  outputs flow on and are ignored by the [CLS] head.
Any ViT-shaped module works: set ``embeddings_module`` / ``layers_module``.
Limits: one active VPT adapter at a time (two would each insert tokens); no per-row adapter routing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...config import PeftConfig, check_bool, check_int, check_probability
from ...kernel_helpers import adapter_dtype
from ...layers import Adapter
from ...registry import register_method
from ._roles import find_path, not_applicable


@dataclasses.dataclass
class VPTConfig(PeftConfig):
    """VPT configuration.

    Args:
        num_virtual_tokens: p, the prompt length (paper: 1..200; 50 is a common choice).
        deep: VPT-deep (fresh prompts at every block's input) instead of VPT-shallow (first block only).
        prompt_dropout: dropout on the prompt tokens during training.
        embeddings_module: path or dotted suffix of the module returning [CLS] + patch tokens (B, 1 + N, d);
            None uses the role table (ViT ``embeddings``, CLIP ``vision_model.embeddings``). Filled on use.
        layers_module: path or dotted suffix of the ``nn.ModuleList`` of blocks (needed for ``deep``);
            None uses the role table. Filled on use.
        modules_to_save: modules trained in full and saved with the adapter (the paper trains the linear
            head with the prompts: ``["classifier"]`` on ViTForImageClassification).
        token_dim: d (filled from the patch projection). patch_fan_in: channels x patch^2 of the patch
            projection, the init's fan-in (filled). num_layers: L (filled when the blocks are found).
    """

    PEFT_TYPE: ClassVar[str] = "VPT"

    num_virtual_tokens: int = 50
    deep: bool = False
    prompt_dropout: float = 0.0
    embeddings_module: str | None = None
    layers_module: str | None = None
    modules_to_save: list[str] | None = None
    token_dim: int | None = None
    patch_fan_in: int | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "num_virtual_tokens", 1, expected="an int >= 1")
        check_bool(self, "deep")
        check_probability(self, "prompt_dropout")


def _patch_conv(module: nn.Module) -> nn.Conv2d | None:
    return next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)


@register_method(
    "vpt",
    config=VPTConfig,
    category="prompt",
    modalities=("vision", "vision-language"),
    mergeable=False,
    param_formula="p x d (shallow); L x p x d (deep)",
    position="p tokens after [CLS] at the first block's input (shallow) or every block's input (deep)",
    starts_at_base=False,
    paper="arXiv 2203.12119 (VPT, Jia et al. 2022)",
    examples={"vpt-deep": {"num_virtual_tokens": 3, "deep": True}},
)
class VPTPrompt(Adapter):
    """The prompts of one insertion point: (p, d), inserted after [CLS] or replacing the prompt slice."""

    checkpoint_keys: ClassVar[dict[str, str]] = {"vpt_prompt": "vpt_prompt"}
    supported_layers = (nn.Module,)  # whole blocks, chosen by role (prepare_config), never by layer type
    supports_routing = False  # the embeddings output grows by p tokens: rows cannot mix with other adapters

    def __init__(self, base: nn.Module, config: VPTConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.p = config.num_virtual_tokens
        self.insert = key == config.embeddings_module  # the embeddings output: insert; a block output: replace
        ref = next(base.parameters(), None)
        dtype = adapter_dtype(ref, keep_half=True)
        device = None if ref is None else ref.device
        self.vpt_prompt = nn.Parameter(torch.zeros(self.p, config.token_dim, dtype=dtype, device=device))
        if init:
            bound = math.sqrt(6.0 / float(config.patch_fan_in + config.token_dim))
            nn.init.uniform_(self.vpt_prompt, -bound, bound)
        self.dropout = nn.Dropout(config.prompt_dropout)

    # -- targeting -------------------------------------------------------------------------------------
    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: VPTConfig) -> None:
        """Resolve the embeddings module and the blocks; fill d, the patch fan-in and L from the model."""
        modules = dict(named)
        emb = find_path(model, named, "vision_embeddings", config.embeddings_module)
        conv = _patch_conv(modules[emb]) if emb is not None else None
        if emb is None or conv is None:
            why = ("no module returning [CLS] + patch tokens" if emb is None
                   else f"{emb!r} has no patch projection (Conv2d), so it is not a vision embeddings module")
            raise not_applicable("vpt", model, f"{why} (set VPTConfig.embeddings_module for a ViT-shaped model)")
        config.embeddings_module = emb
        config.token_dim = conv.out_channels
        config.patch_fan_in = conv.in_channels * math.prod(conv.kernel_size)
        layers = find_path(model, named, "vision_layers", config.layers_module)
        if layers is not None and not isinstance(modules[layers], nn.ModuleList):
            raise not_applicable("vpt", model, f"{layers!r} is a {type(modules[layers]).__name__}, not the "
                                 "ModuleList of blocks (VPTConfig.layers_module)")
        if layers is None and config.deep:
            raise not_applicable("vpt", model, "VPT-deep needs the list of transformer blocks; none found "
                                 "(set VPTConfig.layers_module)")
        if layers is not None:
            config.layers_module = layers
            config.num_layers = len(modules[layers])

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: VPTConfig) -> list[str]:
        paths = [config.embeddings_module]
        if config.deep:  # block i carries the prompts of block i + 1's input; the last block carries none
            paths += [f"{config.layers_module}.{i}" for i in range(config.num_layers - 1)]
        return paths

    @classmethod
    def param_count(cls, base: nn.Module, config: VPTConfig, key: str = "") -> int:
        """Closed form per insertion point: p x d (L of them for VPT-deep, one for shallow)."""
        return config.num_virtual_tokens * config.token_dim

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, base: nn.Module, x: Tensor, out: Any) -> Any:
        hidden = out[0] if isinstance(out, tuple) else out  # (B, 1 + [p] + N, d)
        prompt = self.dropout(self.vpt_prompt).to(hidden.dtype).expand(hidden.shape[0], -1, -1)  # (B, p, d)
        rest = hidden[:, 1:] if self.insert else hidden[:, 1 + self.p:]
        new = torch.cat([hidden[:, :1], prompt, rest], dim=1)
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
