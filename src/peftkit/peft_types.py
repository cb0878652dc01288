"""Hugging Face PEFT's type names: the ``PeftType`` enum and the ``LoftQConfig`` sub-config.

``PeftType`` has every member of peft 0.21's enum (same names and values, same order), followed by the
methods only peftkit has. It is a ``str`` enum, like peft's, so a config's ``peft_type`` string compares
equal to its member (``LoraConfig().peft_type == PeftType.LORA``) and either spelling works as a key of
``PEFT_TYPE_TO_CONFIG_MAPPING``. Members for methods peftkit does not implement exist so that peft code
naming them still imports; building such a config through ``get_peft_config`` raises ``KeyError``.

The engine never imports this module (configs store ``peft_type`` as a plain string).
"""

from __future__ import annotations

import dataclasses
import enum

__all__ = ["LoftQConfig", "PeftType"]


class PeftType(str, enum.Enum):
    """The kind of an adapter: the value written to ``adapter_config.json``'s ``peft_type`` key."""

    # peft 0.21.2, in peft's order
    PROMPT_TUNING = "PROMPT_TUNING"
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    ADALORA = "ADALORA"
    ADAMSS = "ADAMSS"
    BOFT = "BOFT"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    IA3 = "IA3"
    BEFT = "BEFT"
    LILY = "LILY"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    POLY = "POLY"
    LN_TUNING = "LN_TUNING"
    VERA = "VERA"
    FROD = "FROD"
    PVERA = "PVERA"
    FOURIERFT = "FOURIERFT"
    GLORA = "GLORA"
    XLORA = "XLORA"
    HRA = "HRA"
    VBLORA = "VBLORA"
    UNILORA = "UNILORA"
    CPT = "CPT"
    MISS = "MISS"
    RANDLORA = "RANDLORA"
    ROAD = "ROAD"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    HIRA = "HIRA"
    SHIRA = "SHIRA"
    C3A = "C3A"
    WAVEFT = "WAVEFT"
    OSF = "OSF"
    DELORA = "DELORA"
    GRALORA = "GRALORA"
    CARTRIDGE = "CARTRIDGE"
    TINYLORA = "TINYLORA"
    PSOFT = "PSOFT"
    PEANUT = "PEANUT"
    SHADOW = "SHADOW"
    SUPERTUNING = "SUPERTUNING"
    DEFT = "DEFT"
    # methods only peftkit has (their configs' peft_type)
    ADAPTERDROP = "ADAPTERDROP"
    ADAPTFORMER = "ADAPTFORMER"
    BITFIT = "BITFIT"
    CHILD_TUNING = "CHILD_TUNING"
    CLIP_ADAPTER = "CLIP_ADAPTER"
    COCOOP = "COCOOP"
    COMPACTER = "COMPACTER"
    COMPACTER_PP = "COMPACTER_PP"
    COMPOSITION = "COMPOSITION"
    CONTROLNET = "CONTROLNET"
    CONVPASS = "CONVPASS"
    COOP = "COOP"
    DELTALORA = "DELTALORA"
    DIFFFIT = "DIFFFIT"
    DIFF_PRUNING = "DIFF_PRUNING"
    DYLORA = "DYLORA"
    FACT = "FACT"
    FISH_MASK = "FISH_MASK"
    HOULSBY = "HOULSBY"
    HYBRID = "HYBRID"
    IP_ADAPTER = "IP_ADAPTER"
    LAST_K = "LAST_K"
    LLAMA_ADAPTER_V2 = "LLAMA_ADAPTER_V2"
    LORAFA = "LORAFA"
    LST = "LST"
    MAM = "MAM"
    MOLE = "MOLE"
    PARALLEL_ADAPTER = "PARALLEL_ADAPTER"
    PFEIFFER = "PFEIFFER"
    PFEIFFER_INV = "PFEIFFER_INV"
    SSF = "SSF"
    SVDIFF = "SVDIFF"
    T2I_ADAPTER = "T2I_ADAPTER"
    TEXTUAL_INVERSION = "TEXTUAL_INVERSION"
    TIP_ADAPTER = "TIP_ADAPTER"
    UNIPELT = "UNIPELT"
    VPT = "VPT"


@dataclasses.dataclass
class LoftQConfig:
    """LoftQ's options for ``LoraConfig(init_lora_weights="loftq", loftq_config=...)`` (peft's fields and defaults).

    ``LoraConfig`` stores it as the plain dict ``{"loftq_bits": ..., "loftq_iter": ...}``, as peft does, so the
    config serialises to the same JSON whichever form was passed.

    Args:
        loftq_bits: quantization bits of the base weight (peftkit supports 4 and 8).
        loftq_iter: alternating quantize / low-rank iterations.
    """

    loftq_bits: int = dataclasses.field(default=4, metadata={"help": "Quantization bits for LoftQ"})
    loftq_iter: int = dataclasses.field(default=1, metadata={"help": "Alternating iterations for LoftQ"})
