"""ShadowPEFT: a parallel shadow network riding a frozen decoder's layer loop (peft's ``ShadowConfig``).

A small backbone (by default a 1-block copy of the base decoder stack, fed the frozen base embeddings) gives
the initial shadow state ``s^(0) = P(backbone(x))`` (Eq. 1). At every wrapped block l, with ``h`` the block's
input and ``s`` the state:

    delta = h - s                                         (Eq. 2)
    h'    = h + alpha * Dropout(delta) W_down^T W_up^T    (Eq. 3-4; W_down: r x d, W_up: d x r, W_up = 0 at init)
    o     = block(h')
    s'    = (1 - g) s + g T(o),  g = sigmoid(G(o))        (Eq. 5-7; T, G: Linear(d, u) - GELU - Linear(u, d))

and the model continues with ``o``. With labels, the shadow path's own loss on ``s^(0)`` (through the base LM
head, or a copy of the classifier for sequence classification) is added with weight ``lambda`` (Eq. 8-9).
Trainable: ``2 d r + 2 (2 d u + u + d)`` per block, plus the shadow network once. Not mergeable (the
adaptation is an input-dependent trajectory, not a weight delta): merging raises ``NotImplementedError`` as
in peft; ``unload_shadow()`` returns the standalone shadow network (``detached.py``).

File keys (peft's, whose adapter name is always written as ``default``):
``base_model.model.<block>.shadow_down.default.weight`` / ``shadow_up`` / ``shadow_update_transform.default.
{0,2}.{weight,bias}`` / ``shadow_update_gate...``, and model-level ``base_model.shadow_backbone.default.<key>``,
``base_model.shadow_projection.default.weight`` (another width), ``base_model.shadow_head.default.<key>``.

Layout in peftkit: each block's adapter holds its four modules; the adapter on the first wrapped block also
holds the network (``network.py``), built before its own tensors (peft's order, so a seed gives peft's
initial values). One pre-hook on the model seeds ``s^(0)`` and opens the call's state (``hook.py``); the
blocks' wrapper advances it (``wrapper.py``).

Where peftkit differs from peft 0.21.2:
- cached generation: under transformers 5 the model takes its cache as ``cache=``, which peft's hook does not
  read, so its backbone sees each new token without the earlier ones and cached decoding drifts from uncached.
  peftkit unpacks ``cache`` (and ``past_key_values``): generation with the cache gives the uncached tokens,
  which equal peft's uncached ones.
- blocks need not be contiguous (peft's carrier breaks on an unwrapped block between wrapped ones): the state
  passes an unwrapped block unchanged.
- models without a decoder stack (the project's UNet, encoders): ``NotApplicableError``, before the model
  changes (peft raises AttributeError there too for the UNet). Diffusers transformers (peft's Flux2 backbone
  and its token-MLP fallback) are supported (``dit.py``), except under gradient checkpointing (refused).
- two-stream diffusers blocks (SD3's ``JointTransformerBlock``, Flux.1's double- and single-stream blocks) return
  ``(encoder_hidden_states, hidden_states)``: peftkit advances the state from the image stream, the one it injects
  into (``dit.IMAGE_STREAM``); peft reads the first, the text stream, and hands its carrier on as the next block's
  text input (a shape error when the text is not as long as the image tokens, an AttributeError otherwise). Other
  tuple-returning diffusers blocks, and Flux2's double-stream blocks, are refused (``NotApplicableError``).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, ClassVar

from torch import Tensor, nn

from ...kernel_helpers import adapter_dtype
from ...layers import Adapter
from ...registry import register_method
from ...targeting import NotApplicableError, find_targets
from ..prompt.inputs import forward_params
from . import functional as SF
from . import hook
from .config import ShadowConfig
from .dit import DiffusionNetwork, check_targets, is_diffusion
from .network import ShadowNetwork, find_backbone, hidden_size, mirror_config, task
from .wrapper import ShadowLayer

_PLAN = "_shadow_plan"
MERGE_ERROR = ("ShadowPEFT cannot be merged into the base model: the adaptation is an input-dependent, layer-space "
               "trajectory, not a static weight-space delta. Use `unload()` to recover the plain base model, or "
               "`unload_shadow()` for a standalone shadow model.")


@dataclasses.dataclass
class _Plan:
    """What targeting found, for the adapters' constructors: the model (weakly), the blocks, the base width."""

    model: Any
    paths: list[str]
    d: int


def _plan(config: ShadowConfig) -> _Plan:
    plan = vars(config).get(_PLAN)
    if plan is None:
        raise ValueError("ShadowConfig: its adapters are built by get_peft_model / from_pretrained (targeting first)")
    return plan


def _mlp(d: int, u: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, u), nn.GELU(), nn.Linear(u, d))


@register_method(
    "shadow", config=ShadowConfig, category="additive", modalities=("text", "generation"), mergeable=False,
    param_formula="2 d r + 2 (2 d u + u + d) per decoder block (u = update_hidden_size or r), plus the shadow "
                  "backbone (a 1-block copy of the decoder stack; on diffusers transformers a token MLP, or "
                  "Flux2's reduced copy) once",
    position="a parallel shadow network beside the decoder blocks",
    changes_structure=True, paper="ShadowPEFT (peft's SHADOW)",
    examples={"shadow": {"r": 4, "shadow_dropout": 0.1, "share_embeddings": False}},
)
class ShadowAdapter(Adapter):
    supported_layers: ClassVar[tuple[type, ...]] = (nn.Module,)
    default_roles: ClassVar[tuple[str, ...]] = ()
    supports_routing: ClassVar[bool] = False
    layer_cls: ClassVar[type | None] = ShadowLayer

    # -- targets -----------------------------------------------------------------------------------------
    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: ShadowConfig) -> None:
        """Checks before anything changes (a decoder stack, the mirror's sizes); None targets: every block."""
        path, backbone, attr = find_backbone(model)
        diffusion = is_diffusion(model)  # seeded from the first block's input, not from tokens (dit.py)
        if not diffusion and not {"input_ids", "inputs_embeds"} & forward_params(model):
            raise NotApplicableError(f"ShadowPEFT on {type(model).__name__}: its forward takes neither input_ids nor "
                                     "inputs_embeds, from which the shadow backbone computes s^(0) (peft builds it "
                                     "and fails in the forward)")
        hidden_size(getattr(model, "config", None))
        if config.shadow_model == "mirror" and not diffusion:
            mirror_config(backbone, config)
        if config.target_modules is None:
            base = f"{path}.{attr}" if path else attr
            config.target_modules = {f"{base}.{i}" for i in range(len(getattr(backbone, attr)))}

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: ShadowConfig) -> list[str]:
        paths = find_targets(model, named, config, (), (nn.Module,))
        if is_diffusion(model):  # blocks whose image stream is not known, Flux2's double-stream ones (dit.py)
            modules = dict(named)
            check_targets(model, [(p, getattr(modules[p], "base_layer", modules[p])) for p in paths])
        vars(config)[_PLAN] = _Plan(weakref.ref(model), paths, hidden_size(model.config))
        return paths

    @classmethod
    def unreached_params(cls, model: nn.Module) -> set[str]:
        """The last wrapped block's update networks (T, G): the state ``s^(L)`` they produce is read by nothing
        (as in peft, whose count includes them)."""
        adapters = [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]
        last = [n for n, _ in adapters][-1:]
        unused = {f"{n}.network.{p}" for n, m in adapters if isinstance(m.network, DiffusionNetwork)
                  for p in m.network.unused_params()}  # a reduced Flux2's parts the seed never runs
        return unused | {n for n, _ in model.named_parameters()
                         if last and n.startswith(last[0] + ".") and ".shadow_update_" in n}

    @classmethod
    def check_new_adapter(cls, configs: dict[str, Any], config: Any, adapter_name: str) -> None:
        every = [*configs.values(), config]
        if configs and any(task(c) == "SEQ_CLS" for c in every):
            raise ValueError("ShadowPEFT does not support multiple adapters when any adapter uses sequence "
                             "classification because the sequence classification adapter requires both a classifier "
                             "in `modules_to_save` and a separate `shadow_head`.")

    @classmethod
    def param_count(cls, base: nn.Module, config: ShadowConfig, key: str = "") -> int:
        d, r = _plan(config).d, config.r
        u = config.update_hidden_size or r
        return 2 * d * r + 2 * (2 * d * u + u + d)

    @classmethod
    def shared_param_count(cls, targets: list[tuple[str, nn.Module]], config: ShadowConfig) -> int:
        """The network's trainable tensors, counted on the network the adapter built."""
        model = _plan(config).model()
        for m in (model.modules() if model is not None else ()):
            net = getattr(m, "network", None)
            if isinstance(m, ShadowAdapter) and net is not None and m.config is config:
                return sum(p.numel() for p in net.parameters() if p.requires_grad)
        return 0

    # -- the adapter ----------------------------------------------------------------------------------------
    def __init__(self, base: nn.Module, config: ShadowConfig, key: str = "", init: bool = True) -> None:
        super().__init__()
        plan = _plan(config)
        self.__dict__["config"] = config
        self.key = key
        d, r = plan.d, config.r
        u = config.update_hidden_size or r
        self.network = None
        if key == plan.paths[0]:  # the model-level network, built first (peft's order of initialisation)
            model = plan.model()
            self.network = (DiffusionNetwork(model, config, d) if is_diffusion(model)
                            else ShadowNetwork(model, config))
        self.shadow_down = nn.Linear(d, r, bias=False)
        self.shadow_up = nn.Linear(r, d, bias=False)
        self.shadow_dropout = nn.Dropout(p=config.shadow_dropout) if config.shadow_dropout else nn.Identity()
        if config.init_weights:
            nn.init.zeros_(self.shadow_up.weight)
        self.shadow_update_transform = _mlp(d, u)
        self.shadow_update_gate = _mlp(d, u)
        ref = next(base.parameters(), None)
        dtype = adapter_dtype(base)  # the block's dtype, float32 for half-precision blocks (peft's autocast)
        for m in (self.shadow_down, self.shadow_up, self.shadow_update_transform, self.shadow_update_gate):
            m.to(device=ref.device if ref is not None else None, dtype=dtype)
        self.alpha = config.shadow_alpha

    def inject(self, h: Tensor, s: Tensor) -> Tensor:
        return SF.inject(h, s, self.shadow_down.weight, self.shadow_up.weight, self.alpha, self.shadow_dropout)

    def update(self, h: Tensor, s: Tensor) -> Tensor:
        return SF.update(h, s, self.shadow_update_transform, self.shadow_update_gate,
                         self.shadow_update_transform[0].weight.dtype)

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:  # the wrapper runs the block
        return out

    # -- the file ---------------------------------------------------------------------------------------------
    def file_tensors(self, for_save: bool) -> dict[str, Tensor]:
        out = {}
        for part in ("shadow_down", "shadow_up", "shadow_update_transform", "shadow_update_gate"):
            for name, t in getattr(self, part).state_dict(keep_vars=True).items():
                out[f"base_model.model.{self.key}.{part}.default.{name}"] = t
        if self.network is not None:
            for part, module in (("shadow_backbone", self.network.backbone),
                                 ("shadow_projection", self.network.projection), ("shadow_head", self.network.head)):
                for name, t in (module.state_dict(keep_vars=True).items() if module is not None else ()):
                    out[f"base_model.{part}.default.{name}"] = t
        return out

    # -- merging: refused, as peft --------------------------------------------------------------------------
    merge_refusal: ClassVar[str | None] = MERGE_ERROR

    # -- the call ----------------------------------------------------------------------------------------------
    @classmethod
    def install_model_hooks(cls, model: nn.Module) -> None:
        hook.install(model)

    @classmethod
    def remove_model_hooks(cls, model: nn.Module) -> None:
        hook.uninstall(model)
