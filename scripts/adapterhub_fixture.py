"""Write tests/fixtures/adapterhub/: reference outputs of AdapterHub's ``adapters`` package on a tiny BERT.

Run in a throwaway environment that has ``adapters`` (it pins transformers 4.x, which conflicts with the
project's), never in the project's own::

    python3.11 -m venv /tmp/ahvenv
    echo "torch==2.13.0" > /tmp/ah-constraints.txt
    /tmp/ahvenv/bin/pip install -c /tmp/ah-constraints.txt torch==2.13.0 adapters
    /tmp/ahvenv/bin/python scripts/adapterhub_fixture.py

For each AdapterHub method with a peftkit counterpart the script adds the adapter to a tiny BertModel (fixed
seed), replaces every adapter parameter by seeded random values (AdapterHub zero-initialises the parallel
adapter's up-projection and LoRA's B, and its other initialisations are close to zero: either would hide most of
the math) and records, with the model in eval mode:

- ``base.safetensors``: the BertModel's own weights (before any adapter);
- ``adapter_<name>.safetensors``: the adapter's parameters under AdapterHub's own key names;
- ``inputs.safetensors``: ``input_ids`` and ``attention_mask`` (the second row padded);
- ``outputs.safetensors``: AdapterHub's ``last_hidden_state`` per adapter name, plus ``base``;
- ``base_mlm.safetensors``, ``adapter_mlm_seq_bn_inv.safetensors``: a BertForMaskedLM (same config, seed) with
  MAD-X's ``SeqBnInvConfig``, whose logits (``mlm_seq_bn_inv``, and ``mlm_base`` without adapter) exercise the
  invertible adapter's inverse before the tied decoder;
- ``meta.json``: the BERT config, AdapterHub's config dict per adapter, its trainable-parameter count
  (``train_adapter``), and the package versions.

``tests/methods/test_adapterhub_parity.py`` (project environment, no ``adapters`` import) rebuilds the model with
transformers 5, applies the matching peftkit method, copies the weights across and compares. The script is
deterministic: a second run writes byte-identical files.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib

import torch

SEED = 0
SCALE = 0.2  # standard deviation of the random adapter weights
OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "adapterhub"


def adapter_configs() -> dict:
    from adapters import (
        CompacterConfig, CompacterPlusPlusConfig, DoubleSeqBnConfig, LoRAConfig, MAMConfig, ParBnConfig,
        PrefixTuningConfig, SeqBnConfig, SeqBnInvConfig, UniPELTConfig,
    )

    prefix = PrefixTuningConfig(prefix_length=3, bottleneck_size=16)  # reparameterised (flat=False), tanh
    return {
        "double_seq_bn": DoubleSeqBnConfig(reduction_factor=4),  # Houlsby: swish, m = 32 / 4
        "seq_bn": SeqBnConfig(reduction_factor=4),  # Pfeiffer: ReLU, original_ln_before=True
        "par_bn": ParBnConfig(reduction_factor=4),  # parallel adapter: ReLU, scaling 4
        "compacter": CompacterConfig(reduction_factor=4),  # PHM, n = 4, GELU, Houlsby placement
        "compacter_pp": CompacterPlusPlusConfig(reduction_factor=4),  # PHM, Pfeiffer placement
        "mam": MAMConfig(prefix, ParBnConfig(reduction_factor=4)),
        "unipelt": UniPELTConfig(prefix, SeqBnConfig(reduction_factor=4), LoRAConfig(r=2, alpha=2)),
        # MAD-X language adapter: Pfeiffer + NICE coupling after the embeddings (its inverse needs an LM head:
        # see main's "mlm_seq_bn_inv")
        "seq_bn_inv": SeqBnInvConfig(reduction_factor=4),
    }


def bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64)


def config_dict(config) -> dict:
    """AdapterHub's config as plain JSON (a ConfigUnion lists its parts)."""
    d = config.to_dict()
    return json.loads(json.dumps(d, default=str))


def main(out: pathlib.Path) -> None:
    import adapters
    import transformers
    from safetensors.torch import save_file
    from transformers import BertModel

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    base = BertModel(bert_config()).eval()
    base_state = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}

    gen = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(0, 100, (2, 7), generator=gen)
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0

    out.mkdir(parents=True, exist_ok=True)
    save_file(base_state, str(out / "base.safetensors"))
    save_file({"input_ids": input_ids, "attention_mask": attention_mask}, str(out / "inputs.safetensors"))
    with torch.no_grad():
        outputs = {"base": base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.contiguous()}
    meta = {"bert_config": {k: bert_config().to_dict()[k] for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings", "hidden_act", "layer_norm_eps", "type_vocab_size")},
        "versions": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
        "seed": SEED, "weight_std": SCALE, "adapters": {}}

    for i, (name, config) in enumerate(adapter_configs().items()):
        model = copy.deepcopy(base)
        adapters.init(model)
        model.add_adapter(name, config=config)
        model.train_adapter(name)  # freezes everything else: the trainable parameters are the adapter's
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        count = sum(p.numel() for p in params.values())
        g = torch.Generator().manual_seed(SEED + 1 + i)
        with torch.no_grad():
            for key in sorted(params):
                params[key].copy_(torch.randn(params[key].shape, generator=g) * SCALE)
        model.set_active_adapters(name)
        model.eval()
        with torch.no_grad():
            outputs[name] = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.contiguous()
        save_file({k: p.detach().clone().contiguous() for k, p in params.items()},
                  str(out / f"adapter_{name}.safetensors"))
        meta["adapters"][name] = {"config": config_dict(config), "trainable_parameters": count,
                                  "file": f"adapter_{name}.safetensors"}

    # MAD-X on a masked LM: the coupling after the embeddings and its inverse before the tied decoder
    from adapters import SeqBnInvConfig
    from transformers import BertForMaskedLM

    torch.manual_seed(SEED)
    mlm = BertForMaskedLM(bert_config()).eval()
    save_file({k: v.detach().clone().contiguous() for k, v in mlm.state_dict().items()
               if k != "cls.predictions.decoder.weight"},  # tied to the word embeddings
              str(out / "base_mlm.safetensors"))
    with torch.no_grad():
        outputs["mlm_base"] = mlm(input_ids=input_ids, attention_mask=attention_mask).logits.contiguous()
    name = "mlm_seq_bn_inv"
    config = SeqBnInvConfig(reduction_factor=4)
    adapters.init(mlm)
    mlm.add_adapter(name, config=config)
    mlm.train_adapter(name)
    params = {k: p for k, p in mlm.named_parameters() if p.requires_grad}
    count = sum(p.numel() for p in params.values())
    g = torch.Generator().manual_seed(SEED + 100)
    with torch.no_grad():
        for key in sorted(params):
            params[key].copy_(torch.randn(params[key].shape, generator=g) * SCALE)
    mlm.set_active_adapters(name)
    mlm.eval()
    with torch.no_grad():
        outputs[name] = mlm(input_ids=input_ids, attention_mask=attention_mask).logits.contiguous()
    save_file({k: p.detach().clone().contiguous() for k, p in params.items()}, str(out / f"adapter_{name}.safetensors"))
    meta["adapters"][name] = {"config": config_dict(config), "trainable_parameters": count,
                              "file": f"adapter_{name}.safetensors", "model": "BertForMaskedLM"}

    save_file(outputs, str(out / "outputs.safetensors"))
    (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    main(parser.parse_args().out)
