"""The per-architecture role table: which module plays which role, and the architecture-specific defaults.

Methods declare default *roles* (``("query", "value")``); ``peftkit.targeting`` resolves them to module names
through these tables, keyed by ``model.config.model_type`` (or the class name for models without a
transformers config). The defaults select the same modules as Hugging Face PEFT's per-model tables
(``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` and the (IA)3 ones; ``tests/test_default_targets.py``
checks every model type in them).

A role names a module by its name or dotted suffix, or lists several spellings of which the one present in
the model is used. A family with a fused query/key/value projection has the role "qkv" instead of "query",
"key" and "value"; a method asking for any of those gets the fused module (once).
"""

from __future__ import annotations

Table = dict[str, str | tuple[str, ...]]

_LLAMA: Table = {
    "query": "q_proj", "key": "k_proj", "value": "v_proj", "attn_out": "o_proj",
    "ffn_gate": "gate_proj", "ffn_in": "up_proj", "ffn_out": "down_proj",
    "attention_output": "o_proj", "ffn_output": "down_proj", "ffn": "mlp"}
_BERT: Table = {
    "query": "query", "key": "key", "value": "value", "attn_out": "attention.output.dense",
    "ffn_in": "intermediate.dense", "ffn_out": "output.dense",
    # the FFN is split over intermediate + output (see SPLIT_FFN): "ffn" names its output Linear
    "attention_output": "attention.output.dense", "ffn_output": "output.dense", "ffn": "output.dense",
    # every module named "dense" (attention output, FFN, pooler): PEFT's AdaLoRA default on RoBERTa
    "dense": "dense"}
_BERT_NO_QKV: Table = {k: v for k, v in _BERT.items() if k not in ("query", "key", "value")}
# separate q/k/v projections and "out_proj" (BART, OPT, GPT-J, GPT-Neo); the FFN's names vary (_ffn)
_QKVO: Table = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "attn_out": "out_proj",
               "attention_output": "out_proj"}


def _ffn(ffn_in: str, ffn_out: str, ffn: str | None = "mlp") -> Table:
    """FFN roles: input and output Linear, and the FFN module when there is one."""
    return {"ffn_in": ffn_in, "ffn_out": ffn_out, "ffn_output": ffn_out, **({"ffn": ffn} if ffn else {})}


# role -> module name, per architecture family. One table for every method.
ROLE_TABLE: dict[str, Table] = {
    "llama": _LLAMA,
    "gpt2": {"qkv": "c_attn", "attn_out": "attn.c_proj", "ffn_in": "c_fc", "ffn_out": "mlp.c_proj",
             "attention_output": "attn.c_proj", "ffn_output": "mlp.c_proj", "ffn": "mlp"},
    "bert": _BERT,
    "deberta-v2": {**_BERT, "query": "query_proj", "key": "key_proj", "value": "value_proj"},
    "deberta": {**_BERT_NO_QKV, "qkv": "in_proj"},
    "t5": {"query": "q", "key": "k", "value": "v", "attn_out": "o", "ffn_in": "wi", "ffn_out": "wo",
           "attention_output": "o", "ffn_output": "wo", "ffn": "DenseReluDense"},
    # BART and OPT: the FFN is fc1 / fc2 directly in the layer (no FFN module)
    "bart": {**_QKVO, **_ffn("fc1", "fc2", None)},
    "phi": {**_QKVO, "attn_out": "dense", "attention_output": "dense", **_ffn("fc1", "fc2")},
    "gptj": {**_QKVO, **_ffn("fc_in", "fc_out")},
    "codegen": {"qkv": "qkv_proj", "attn_out": "out_proj", "attention_output": "out_proj", **_ffn("fc_in", "fc_out")},
    "gpt_neo": {**_QKVO, **_ffn("c_fc", "c_proj")},
    # GPT-NeoX, BLOOM, Falcon, ChatGLM: fused query_key_value, attention output "dense"
    "gpt_neox": {"qkv": "query_key_value", "attn_out": "dense", "attention_output": "dense",
                 **_ffn("dense_h_to_4h", "dense_4h_to_h")},
    "mpt": {"qkv": "Wqkv", "attn_out": "out_proj", "attention_output": "out_proj",
            **_ffn("up_proj", "down_proj", "ffn")},
    "nemotron_h": {"query": "q_proj", "key": "k_proj", "value": "v_proj", "attn_out": "o_proj",
                   "attention_output": "o_proj", **_ffn("up_proj", "down_proj", None)},
    # BLIP-2: only the language model (OPT or T5) has these names; the vision tower's attention is fused
    # ("qkv") and the Q-Former's is BERT's, so neither is a default target (as in PEFT)
    "blip-2": {"query": ("q_proj", "q"), "key": ("k_proj", "k"), "value": ("v_proj", "v"),
               "attn_out": ("out_proj", "o"), "attention_output": ("out_proj", "o")},
    # RWKV time mixing: receptance plays the query. The names are unqualified as in PEFT, so they also
    # select the channel-mixing (FFN) block's key / value / receptance
    "rwkv": {"query": "receptance", "key": "key", "value": "value", "attn_out": "output"},
    "rwkv7": {"query": "r_proj", "key": "k_proj", "value": "v_proj", "attn_out": "o_proj",
              **_ffn("key", "value", None)},
    # transformers 5 renamed ViT's projections; both spellings are listed, the present one is used
    "vit": {"query": ("query", "q_proj"), "key": ("key", "k_proj"), "value": ("value", "v_proj"),
            "attn_out": ("attention.output.dense", "o_proj"), "ffn_in": ("intermediate.dense", "fc1"),
            "ffn_out": ("output.dense", "fc2"), "attention_output": ("attention.output.dense", "o_proj"),
            "ffn_output": ("output.dense", "fc2"), "ffn": "mlp",
            # whole-block roles (VPT): the module returning [CLS] + patch tokens, the list of blocks
            "vision_embeddings": "embeddings", "vision_layers": ("encoder.layer", "layers")},
    "clip": {"query": "q_proj", "key": "k_proj", "value": "v_proj", "attn_out": "out_proj",
             "ffn_in": "fc1", "ffn_out": "fc2", "attention_output": "out_proj", "ffn_output": "fc2", "ffn": "mlp",
             # vision tower blocks (VPT), text token embedding (CoOp), projected features (CLIP-/Tip-Adapter)
             "vision_embeddings": ("vision_model.embeddings", "embeddings"),
             "vision_layers": ("vision_model.encoder.layers", "encoder.layers"),
             "text_token_embedding": "embeddings.token_embedding",
             "image_features": "visual_projection", "text_features": "text_projection"},
    "unet": {"query": "to_q", "key": "to_k", "value": "to_v", "attn_out": "to_out.0",
             "ffn_in": "ff.net.0.proj", "ffn_out": "ff.net.2",
             "attention_output": "to_out.0", "ffn_output": "ff.net.2", "ffn": "ff"},
}
# Families whose FFN is not one module but two siblings, (output module, input module): BERT's
# ``intermediate`` (d -> d_ff, activation) and ``output`` (d_ff -> d, dropout, residual, LayerNorm). A module
# parallel to the whole FFN wraps the output Linear and reads the FFN input at the input Linear's input.
SPLIT_FFN: dict[str, tuple[str, str]] = {
    f: ("output.dense", "intermediate.dense") for f in ("bert", "deberta", "deberta-v2")}
# model types that share a family's table
FAMILY_ALIASES = {
    "mistral": "llama", "mixtral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
    "gemma2": "llama", "gemma3_text": "llama", "gemma4": "llama", "gemma4_text": "llama", "phi3": "llama",
    "llama4": "llama", "stablelm": "llama",
    "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert", "electra": "bert", "layoutlm": "bert",
    "mt5": "t5", "opt": "bart", "gpt_bigcode": "gpt2", "btlm": "gpt2",
    "bloom": "gpt_neox", "falcon": "gpt_neox", "RefinedWeb": "gpt_neox", "RefinedWebModel": "gpt_neox",
    "chatglm": "gpt_neox",
    "clip_text_model": "clip", "clip_vision_model": "clip", "siglip": "clip",
    "unet2dconditionmodel": "unet", "transformer2dmodel": "unet", "sd3transformer2dmodel": "unet",
}
# model types that use their family's table with a few other names
ROLE_OVERRIDES: dict[str, Table] = {
    # mT5's FFN is gated: wi_0 (gate), wi_1 (up)
    "mt5": {"ffn_gate": "wi_0", "ffn_in": "wi_1"},
    # Mixtral's experts (transformers < 5; version 5 fuses them into parameters, which no name selects)
    "mixtral": {"ffn_gate": "w1", "ffn_in": "w3", "ffn_out": "w2", "ffn_output": "w2",
                "ffn": ("mlp", "block_sparse_moe")},
}

# PEFT's default for LoRA and the methods that copy its table (LoHa, LoKr, OFT, BOFT, FourierFT; VeRA except
# on phi) is the query and value projections, except on these architectures (model type or family -> roles).
# They replace the roles ("query", "value") of a method whose default_roles do not name the architecture.
QUERY_VALUE = ("query", "value")
QUERY_VALUE_DEFAULTS: dict[str, tuple[str, ...]] = {
    "phi": ("query", "value", "ffn_in", "ffn_out"),
    "nemotron_h": ("query", "key", "value", "attn_out"),
    "rwkv": ("query", "key", "value", "attn_out"),
    "rwkv7": ("query", "key", "value", "attn_out", "ffn_in", "ffn_out"),
    "btlm": ("qkv", "attn_out", "ffn_out"),  # PEFT: "c_attn", "c_proj" (attention and FFN output)
}
# Multimodal model types whose towers reuse the language model's module names: default targets are only
# the modules under this submodule (a regex, as PEFT's table has for them).
DEFAULT_SCOPES: dict[str, str] = {"gemma4": "language_model"}
