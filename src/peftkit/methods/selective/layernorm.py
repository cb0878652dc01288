"""LayerNorm tuning (Zhao et al. 2023, arXiv 2312.11420): train only the normalization layers' weights and
biases. Compatible with Hugging Face PEFT's ``LNTuningConfig``: the same fields and defaults, the same
targets, and the same file (a full copy of each tuned module's parameters under
``<module path>.ln_tuning_layers.<param>``), so adapters load in either library.

As in PEFT, each targeted module gets a trainable copy of its own parameters and the layer runs with the
copy; the original stays for ``disable_adapter``, and merging writes the copy in. Norm parameters are
small, so the copy costs nothing worth avoiding.

Default targets: PEFT's table where it has the architecture (copied below, ``peft.utils.constants``),
else every normalization module of the model (LayerNorm, GroupNorm, RMSNorm variants), where PEFT would
ask for ``target_modules``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...config import PeftConfig
from ...layers import Adapter
from ...registry import register_method
from ...targeting import NotApplicableError, TargetError, find_targets
from .select import own_params, task_heads

# Hugging Face PEFT's TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING (peft 0.21)
PEFT_TARGETS: dict[str, list[str]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "llava": ["multi_modal_projector", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens",
              "lm_head"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "gptj": ["ln_1", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"],
    "gemma3_text": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
}


@dataclasses.dataclass
class LNTuningConfig(PeftConfig):
    """LayerNorm tuning configuration (fields and defaults as in Hugging Face PEFT).

    Args:
        target_modules: modules to tune (names / dotted suffixes, or a full-match regex); None picks the
            architecture's normalization layers.
        exclude_modules: names or regex never to tune.
        modules_to_save: modules trained in full and saved with the adapter (the task head is added for
            classification task types).
    """

    PEFT_TYPE: ClassVar[str] = "LN_TUNING"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]


def is_norm(module: nn.Module) -> bool:
    """A normalization layer with its own parameters (torch's, or a model's own ``*Norm`` class)."""
    if not own_params(module):
        return False
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return True
    return type(module).__name__.lower().endswith("norm")


@register_method(
    "ln_tuning",
    config=LNTuningConfig,
    category="selective",
    modalities=("text", "vision", "vision-language", "generation"),
    mergeable=True,
    param_formula="the parameters of every targeted normalization layer",
    position="normalization layers",
    paper="arXiv 2312.11420 (LN tuning)",
    examples={"ln_tuning": {}},
)
class LNTuningAdapter(Adapter):
    supported_layers: ClassVar[tuple[type, ...]] = (nn.Module,)
    default_roles: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base: nn.Module, config: LNTuningConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        self.names = tuple(n for n, _ in own_params(base))
        self.checkpoint_keys = {n: f"ln_tuning_layers.{n}" for n in self.names}
        self.merged_params = self.names
        for name, p in own_params(base):
            self.register_parameter(name, nn.Parameter(p.detach().clone()))
        self._originals: dict[str, Tensor] = {}

    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: LNTuningConfig) -> None:
        """``target_modules=None`` becomes PEFT's names for this architecture, or every norm layer's path."""
        if config.target_modules is not None:
            return
        cfg = getattr(model, "config", None)
        model_type = cfg.get("model_type") if isinstance(cfg, dict) else getattr(cfg, "model_type", None)
        if model_type in PEFT_TARGETS:
            config.target_modules = sorted(PEFT_TARGETS[model_type])
            return
        heads = task_heads(config)
        config.target_modules = [p for p, m in named if p and is_norm(m)
                                 and not any(p == h or p.endswith("." + h) or p.startswith(h + ".") for h in heads)]
        if not config.target_modules:
            raise NotApplicableError(f"LN tuning: {type(model).__name__} has no normalization layer with parameters of "
                                     "its own (an affine weight or bias); set target_modules")

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: LNTuningConfig) -> list[str]:
        modules = dict(named)
        found = find_targets(model, named, config, cls.default_roles, cls.supported_layers)
        bad = [p for p in found if any(any(True for _ in c.parameters()) for c in modules[p].children())]
        if bad:
            raise TargetError(f"LN tuning copies a module's own parameters; {bad[0]!r} is a container "
                              f"({type(modules[bad[0]]).__name__}): target its norm layers instead")
        return [p for p in found if own_params(modules[p])]

    @classmethod
    def param_count(cls, base: nn.Module, config: LNTuningConfig, key: str = "") -> int:
        return sum(p.numel() for _, p in own_params(base))

    def _copies(self) -> dict[str, Tensor]:
        return {n: getattr(self, n) for n in self.names}

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        if base._forward_hooks or base._forward_pre_hooks:
            return None
        return torch.func.functional_call(base, self._copies(), (x,))

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        # with other adapters on the layer: add this one's change of the output
        return out + (torch.func.functional_call(base, self._copies(), (x,)) - base(x)).to(out.dtype)

    def effective_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        """The trained copy, differentiable and without merge's record; for a caller that reads the parameter
        instead of calling the layer (``nn.TransformerEncoderLayer``'s fused path, see ``peftkit.mha``)."""
        return getattr(self, name).to(value.dtype)

    # merging writes the copy in; unmerge gives the original back (kept at merge time)
    def merge(self, base: nn.Module, weight: Tensor) -> tuple[Tensor, Any]:
        return self.weight.detach().to(weight.dtype).clone(), weight

    def unmerge(self, base: nn.Module, weight: Tensor, state: Any) -> Tensor:
        return state.clone()

    def merge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        self._originals[name] = value
        return getattr(self, name).detach().to(value.dtype).clone()

    def unmerge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        return self._originals[name].clone()
