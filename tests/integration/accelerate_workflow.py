"""accelerate's prepare() on a peftkit model (training steps, unwrap, is_peft_model) and transformers'
``model.load_adapter(folder)`` of a peftkit adapter folder."""

from __future__ import annotations

from peftkit import LoraConfig, PeftModel, get_peft_model

import torch
from accelerate import Accelerator
from accelerate.utils import is_peft_model
from transformers import LlamaForCausalLM

from tests.integration.common import setup, tiny_llama, token_rows, write


def main() -> None:
    out = setup()
    tiny_llama().save_pretrained(f"{out}/base")
    torch.manual_seed(1)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(f"{out}/base"),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    acc = Accelerator(cpu=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    prepared, opt = acc.prepare(model, opt)
    rows = token_rows(4)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    losses = []
    for _ in range(3):
        loss = prepared(**batch).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    unwrapped = acc.unwrap_model(prepared)
    unwrapped.save_pretrained(f"{out}/adapter")
    ids = batch["input_ids"]
    with torch.no_grad():
        expected = unwrapped.eval()(input_ids=ids).logits
        plain = LlamaForCausalLM.from_pretrained(f"{out}/base").eval()
        plain.load_adapter(f"{out}/adapter")
        loaded = plain(input_ids=ids).logits
    write(out, {"losses": losses, "is_peft_model": is_peft_model(prepared), "unwrapped_is_peftkit": isinstance(unwrapped, PeftModel),
                "load_adapter_gap": (loaded - expected).abs().max().item(),
                "load_adapter_configs": sorted(plain.peft_config)})


if __name__ == "__main__":
    main()
