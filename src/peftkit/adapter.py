"""The adapter contract: everything a method may implement, declared in one class.

A method is a config class plus an ``Adapter`` subclass registered with ``@register_method``. The engine
(``tuner.py``, ``layers.py``, ``checkpoint.py``, ``routing.py``, ``mha.py``) calls only what this class
declares; each hook has a default that does nothing or the common thing, so a new method implements its
math (``forward``, ``delta_weight`` or ``merge``/``unmerge``) and ``checkpoint_keys``, and nothing else
unless it needs to.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar

from torch import Tensor, nn

from .targeting import find_targets


class Adapter(nn.Module):
    """One named adapter on one base layer.

    Subclasses implement ``forward(base, x, out)`` (return the layer output with the adapter applied,
    given the running output ``out``, which the adapter owns: it may accumulate into it in place, so a
    caller that reads ``out`` afterwards passes a copy) and, when mergeable, ``delta_weight(base)`` in the base weight's
    layout, or ``merge``/``unmerge`` for methods that are not additive (e.g. DoRA, OFT).
    ``checkpoint_keys`` maps each parameter name to its key suffix in the Hugging Face PEFT file layout.
    """

    checkpoint_keys: ClassVar[dict[str, str]] = {}
    supported_layers: ClassVar[tuple[type, ...]] = ()
    # False for adapters that change the layer output's shape (VPT inserts tokens): a mixed batch
    # (``adapter_names``) cannot route their rows, and says so instead of failing on shapes
    supports_routing: ClassVar[bool] = True
    changes_output: ClassVar[bool] = True  # False: the layer's forward skips it (prompts rewrite model inputs)
    default_roles: ClassVar[tuple[str, ...]] = ("query", "value")
    @classmethod
    def unreached_params(cls, model: nn.Module) -> set[str]:
        """Names (``model.named_parameters()``) of trained parameters that the call's output does not reach,
        kept trainable to match peft's count (Shadow: the last block's update networks produce a state nothing
        reads). The contract suite lets these alone go without a gradient. Default: none."""
        return set()

    @classmethod
    def prepare_model(cls, model: nn.Module, config: Any) -> None:
        """Change the model's structure before targeting (LoRA's ``layer_replication`` repeats layers with shared
        weights). Check everything before changing anything; the change stays with the model, and loading an
        adapter with this config makes it again."""

    @classmethod
    def prepare_config(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> None:
        """Fill architecture-dependent config defaults before targeting (``named``: candidate modules)."""

    @classmethod
    def select_targets(cls, model: nn.Module, named: list[tuple[str, nn.Module]], config: Any) -> list[str]:
        """Paths of the modules to wrap (default: the config's targets; selective methods pick by parameter)."""
        return find_targets(model, named, config, cls.default_roles, cls.supported_layers)

    @classmethod
    def plan_parameters(cls, model: nn.Module, config: Any, adapter_name: str, paths: list[str],
                        init: bool) -> Callable[[], None] | None:
        """Adapters on named parameters rather than modules (LoRA's ``target_parameters``): check the config's and
        build them before anything changes, and return the function that attaches them (called once, just before
        the module wrappers are attached; it must not fail). ``paths``: the modules this adapter wraps. None (the
        default): the method adapts modules only."""
        return None

    @classmethod
    def check_new_adapter(cls, configs: dict[str, Any], config: Any, adapter_name: str) -> None:
        """Refuse a new adapter before anything changes (``configs``: the model's adapters so far). Raise
        ``ValueError`` naming the rule (AdaLoRA: one trainable adapter per model)."""

    @classmethod
    def param_count(cls, base: nn.Module, config: Any, key: str = "") -> int:
        """Closed form of the trainable parameters a new adapter adds on ``base`` (``key``: the layer's path, for
        rank / alpha patterns). The method table (``counts.py``) and the contract suite compare it with the
        measured count."""
        raise NotImplementedError(f"{cls.__name__} has no closed-form parameter count")

    @classmethod
    def add_weighted_adapter(cls, model: Any, adapters: list[str], weights: list[float], adapter_name: str,
                             **kwargs: Any) -> None:
        """``PeftModel.add_weighted_adapter``: add ``adapter_name``, the model's ``adapters`` (the first of them of
        this method; names already checked) combined with ``weights``. Only LoRA combines adapters (as in peft)."""
        configs = getattr(model, "peft_config", {})
        other = {a: str(configs[a].peft_type) for a in adapters if str(configs[a].peft_type) != "LORA"}
        raise ValueError(f"add_weighted_adapter merges LoRA adapters only; {other} are other methods")

    # -- the wrapper and the model ---------------------------------------------------------------------
    # The wrapper class of this method's layers; None: the shared ``AdapterLayer``. A method whose adapter must
    # see more than one layer's input and output (LLaMA-Adapter's gated attention) brings its own subclass.
    layer_cls: ClassVar[type | None] = None

    # A field of *other* methods' configs through which they add this method's adapters under the same adapter
    # name (peft's auxiliary wrappers: ``LoraConfig.trainable_token_indices`` adds trainable tokens). When a
    # config's value of it is not None, the tuner also wraps ``select_targets(model, named, config)`` (given that
    # config) with this class, built with that config, before anything changes (``auxiliary.py``).
    auxiliary_field: ClassVar[str | None] = None

    @classmethod
    def after_inject(cls, model: nn.Module, adapter_name: str) -> None:
        """Called once the new adapter's layers are all in place (before the model hooks): a method whose layers
        refer to each other links them here (trainable tokens: layers tied to the input embedding share its
        tensor). Must not fail."""

    @classmethod
    def install_model_hooks(cls, model: nn.Module) -> None:
        """Called after an adapter of this method is added to ``model`` (the user's model, not the wrapper):
        methods that act on the whole call rather than on one layer's output (prompt methods rewrite the
        call's inputs) install their forward hooks here. Must be idempotent: it runs once per added adapter."""

    @classmethod
    def remove_model_hooks(cls, model: nn.Module) -> None:
        """Undo ``install_model_hooks`` (``unload``): the model is left as it was before the first adapter."""

    @classmethod
    def call_context(cls, model: Any, call: dict[str, Any]) -> AbstractContextManager | None:
        """Per-call state around one ``PeftModel`` forward or ``generate`` (aLoRA finds each row's invocation
        sequence in the prompt once, and its layers read where it starts). ``model``: the ``PeftModel``;
        ``call``: ``{"args": positional arguments, "kwargs": keyword arguments, "adapter_names": the mixed
        batch's names or None, "generate": bool}``; a method pops its own arguments from ``call["kwargs"]`` (so
        they do not reach the base model). Return a context manager, entered around the call, or None (the
        default: nothing). Per-call state lives in a thread-local the context sets and restores, never on the
        layers, which request threads share (as ``routing.routed``)."""
        return None

    # -- data-dependent setup ----------------------------------------------------------------------------
    @classmethod
    def prepare_selection(cls, model: Any, adapter_name: str, dataloader: Any = None, loss_fn: Any = None,
                          **kwargs: Any) -> None:
        """``PeftModel.prepare_selection``: a step on data before training (the FISH mask scores parameters by
        Fisher information over ``dataloader``). The default does nothing, so a training loop may always call it."""

    # -- the adapter file ----------------------------------------------------------------------------------
    def file_tensors(self, for_save: bool) -> dict[str, Tensor] | None:
        """Checkpoint key -> tensor, whole keys, for an adapter that names its own (prompt methods: PEFT's
        ``prompt_embeddings``); what it saves may be computed (``for_save``: P-tuning saves its encoder's output)
        and differ from where a load copies to. None (the default): the keys are ``<layer path>.<suffix>`` from
        ``checkpoint_keys``."""
        return None

    @classmethod
    def names_file_keys(cls) -> bool:
        """Whether the method overrides ``file_tensors`` (its tensors are not described by ``checkpoint_keys``)."""
        return cls.file_tensors is not Adapter.file_tensors

    # -- optional training-loop hooks; the TunerModel calls them for each active, trainable adapter -------
    @classmethod
    def on_step(cls, tuner: Any, adapter_name: str, global_step: int) -> None:
        """Once per training step (``PeftModel.update_and_allocate``), after backward, before zero_grad.

        Per-adapter state kept between steps goes in ``tuner.hook_state[adapter_name]`` (e.g. AdaLoRA's
        importance averages)."""

    @classmethod
    def extra_loss(cls, tuner: Any, adapter_name: str) -> Tensor | None:
        """A term the forward adds to the model's loss when it computes one (e.g. AdaLoRA's penalty)."""
        return None

    def requires_grad_(self, requires_grad: bool = True) -> "Adapter":
        """As ``nn.Module.requires_grad_``, without the generic recursive walk (the tuner calls it for every
        adapter of every layer whenever the trainable set changes, e.g. on each adapter load)."""
        for p in self._parameters.values():
            if p is not None:
                p.requires_grad_(requires_grad)
        for m in self._modules.values():
            if m is not None:
                m.requires_grad_(requires_grad)
        return self

    def before_load(self) -> None:
        """Called on each adapter before a state dict is validated and copied in (e.g. AdaLoRA drops the
        ranks its files leave out)."""

    def forward(self, base: nn.Module, x: Tensor, out: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_around(self, base: nn.Module, x: Tensor, inner: Callable[[Tensor], Tensor]) -> Tensor:
        """The adapter applied around ``inner`` (its input -> the output of the base layer with the adapters
        nested inside this one), for layers that nest adapters as peft's mixed model does (``mixed_model.py``).
        The default acts on the output: ``forward(base, x, inner(x))``, right for a method that adds to (or
        transforms) the output given the layer's input. A method that transforms the layer's *input* (OFT
        rotates it) overrides it with ``inner(transformed x)``, so the adapters inside see the transformed input."""
        return self.forward(base, x, inner(x))

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """Optional fast path: base and adapter output in one pass, or None to decline.

        Called when this is the single unmerged active adapter and the layer got only ``x``.
        """
        return None

    @classmethod
    def batched_forward(
        cls, adapters: list["Adapter"], base: nn.Module, x: Tensor, out: Tensor, index: Tensor, cache: dict
    ) -> Tensor | None:
        """Optional mixed-batch path: ``out`` with row i passed through ``adapters[index[i]]``, all rows at
        once; ``index[i] == len(adapters)`` means no adapter of this method (the row stays as it is).

        ``cache``: a dict owned by the layer for stacked tensors (``routing.cached_stack``). Return None to
        decline; the layer then loops over the adapters, one ``forward`` on each one's rows.
        """
        return None

    # a method whose adapters never merge (a side network, an input-dependent branch): why, raised by the defaults
    # of check_merge (before anything changes) and delta_weight
    merge_refusal: ClassVar[str | None] = None

    def check_merge(self, base: nn.Module) -> None:
        """Refuse a merge before anything changes: raise with the reason when no merged weight can stand for this
        adapter (aLoRA adapts only part of each sequence). ``merge_adapter`` / ``merge_and_unload`` call it for
        every adapter they would merge, on every layer, before any layer changes. The default allows it unless
        ``merge_refusal`` gives a reason."""
        if self.merge_refusal is not None:
            raise NotImplementedError(self.merge_refusal)

    def delta_weight(self, base: nn.Module) -> Tensor:
        raise NotImplementedError(self.merge_refusal or f"{type(self).__name__} cannot be merged into the base weight")

    def merge(self, base: nn.Module, weight: Tensor) -> tuple[Tensor, Any]:
        """The merged weight, plus whatever ``unmerge`` needs later (here nothing)."""
        return weight + self.delta_weight(base).to(weight.dtype), None

    def unmerge(self, base: nn.Module, weight: Tensor, state: Any) -> Tensor:
        return weight - self.delta_weight(base).to(weight.dtype)

    # base parameters a merge rewrites; methods that also fold into others (e.g. a bias) list them
    merged_params: ClassVar[tuple[str, ...]] = ("weight",)

    def merge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        """Merged value of a base parameter other than the weight (see ``merged_params``)."""
        raise NotImplementedError

    def unmerge_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        raise NotImplementedError

    def missing_param(self, base: nn.Module, name: str) -> Tensor | None:
        """Neutral value of a ``merged_params`` entry the base lacks (e.g. a zero bias for SSF's shift on a
        bias-free Linear): the merge creates the parameter from it and unmerge removes it again. None (the
        default): the merge skips that parameter."""
        return None

    def effective_param(self, base: nn.Module, name: str, value: Tensor) -> Tensor:
        """``value`` (the base parameter ``name``, or the result of the adapters before this one) with this adapter
        applied, differentiable in the adapter's parameters and free of side effects: used where a parent module
        reads a child's weight instead of calling it (``nn.MultiheadAttention``'s ``out_proj``, ``mha.py``).
        The default is the merge; a method whose merge is not that (selective methods merge a detached delta,
        LN tuning records the original) overrides it."""
        if name == "weight":
            return self.merge(base, value)[0]
        return self.merge_param(base, name, value)

    @classmethod
    def has_own_effective_param(cls) -> bool:
        """Whether the method overrides ``effective_param`` (it applies its own dropout there, say)."""
        return cls.effective_param is not Adapter.effective_param

    # -- adapter-level state, shared by all of one adapter's layers (e.g. VeRA's random projections) ------
    # The tuner builds it once per injection with ``build_shared`` and keeps it as frozen buffers in one
    # place (``TunerModel.shared_state[adapter_name]``); every layer's adapter receives it as ``shared=``.
    uses_shared_state: ClassVar[bool] = False
    # shared tensor name -> its key in the adapter file after "base_model." (PEFT: "base_model.vera_A")
    shared_checkpoint_keys: ClassVar[dict[str, str]] = {}

    @classmethod
    def build_shared(
        cls,
        targets: list[tuple[str, nn.Module]],
        config: Any,
        others: dict[str, tuple[Any, dict[str, Tensor]]],
    ) -> dict[str, Tensor]:
        """The shared tensors of a new adapter on ``targets`` (path, base layer), built before any layer.

        ``others``: adapters of the same method already on the model, name -> (config, shared tensors).
        Called with ``init=False`` too (loading): tensors a file may omit must be rebuilt deterministically.
        """
        return {}

    @classmethod
    def saves_shared(cls, config: Any) -> bool:
        """Whether the adapter file holds the shared tensors (when absent on load, the rebuilt ones stay)."""
        return True

    @classmethod
    def shared_param_count(cls, targets: list[tuple[str, nn.Module]], config: Any) -> int:
        """Closed form of the adapter-level parameters that train (VB-LoRA's vector bank), from the config and
        the targets (path, base layer) alone: counted once per adapter, beside ``param_count`` per layer. The
        default, 0, is right for frozen shared tensors (VeRA's projections) and for methods without any."""
        return 0
