"""trl's SFTTrainer and DPOTrainer driving a peftkit LoRA model (the reference is the disabled adapter)."""

from __future__ import annotations

from peftkit import LoraConfig, get_peft_model

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from tests.integration.common import files, setup, tiny_llama, write

WORDS = "the a cat dog sat on mat good bad yes no".split()


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def lora_b(model) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


def changed(model, before: dict[str, torch.Tensor]) -> bool:  # noqa: ANN001
    return all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def main() -> None:
    out = setup()
    tok = tokenizer()
    tiny_llama().save_pretrained(f"{out}/base")
    from transformers import LlamaForCausalLM

    common = dict(max_steps=3, per_device_train_batch_size=2, report_to=[], use_cpu=True, logging_steps=1,
                  save_steps=3, disable_tqdm=True, learning_rate=1e-2, seed=0)
    torch.manual_seed(1)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(f"{out}/base"),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    before = lora_b(model)
    sft = SFTTrainer(model=model, args=SFTConfig(output_dir=f"{out}/sft", **common), processing_class=tok,
                     train_dataset=Dataset.from_list([{"text": "the cat sat on the mat"}, {"text": "a dog sat"}] * 4))
    sft.train()
    sft.save_model(f"{out}/sft/final")
    sft_changed = changed(model, before)

    torch.manual_seed(2)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(f"{out}/base"),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    before = lora_b(model)
    dpo = DPOTrainer(model=model, args=DPOConfig(output_dir=f"{out}/dpo", **common), processing_class=tok,
                     train_dataset=Dataset.from_list([{"prompt": "the cat", "chosen": " sat", "rejected": " bad"}] * 6))
    dpo.train()
    dpo.save_model(f"{out}/dpo/final")
    logs = [h for h in dpo.state.log_history if "loss" in h]
    write(out, {"files": files(out), "sft_steps": sft.state.global_step, "dpo_steps": dpo.state.global_step,
                "sft_changed": sft_changed, "dpo_changed": changed(model, before),
                "dpo_losses": [h["loss"] for h in logs], "dpo_margins": [h.get("rewards/margins") for h in logs],
                "adapters": sorted(model.peft_config)})


if __name__ == "__main__":
    main()
