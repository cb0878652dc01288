"""transformers.Trainer driving a peftkit LoRA model: tied embeddings, label smoothing, checkpoints,
save_model, resume, gradient checkpointing, and a bitsandbytes 4-bit base."""

from __future__ import annotations

# peftkit is imported before transformers' Trainer: it serves `peft` from then on (see peftkit.compat)
from peftkit import LoraConfig, get_peft_model

import torch
from safetensors.torch import load_file
from transformers import BitsAndBytesConfig, LlamaForCausalLM, Trainer, TrainingArguments

from tests.integration.common import files, setup, tiny_llama, token_rows, write


def lora(model):  # noqa: ANN001, ANN201
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))


def run(out: str, name: str, model, steps: int = 4, resume: str | None = None, **kw) -> Trainer:  # noqa: ANN001
    args = TrainingArguments(output_dir=f"{out}/{name}", per_device_train_batch_size=4, max_steps=steps,
                             save_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1,
                             disable_tqdm=True, seed=0, **kw)
    trainer = Trainer(model=model, args=args, train_dataset=token_rows())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def main() -> None:
    out = setup()
    tiny_llama(tied=True).save_pretrained(f"{out}/base")
    model = lora(LlamaForCausalLM.from_pretrained(f"{out}/base"))
    trainer = run(out, "run", model, label_smoothing_factor=0.1)
    trainer.save_model(f"{out}/run/final")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    resumed = run(out, "run", lora(LlamaForCausalLM.from_pretrained(f"{out}/base")), resume=f"{out}/run/checkpoint-2",
                  label_smoothing_factor=0.1)
    resumed.save_model(f"{out}/resumed")

    ckpt = run(out, "gc", lora(LlamaForCausalLM.from_pretrained(f"{out}/base")), label_smoothing_factor=0.1,
               gradient_checkpointing=True)
    ckpt.save_model(f"{out}/gc/final")

    quant = LlamaForCausalLM.from_pretrained(
        f"{out}/base", device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    qmodel = lora(quant)
    before = load_file(f"{out}/run/final/adapter_model.safetensors")  # same keys
    q = run(out, "qlora", qmodel, steps=2)
    q.save_model(f"{out}/qlora/final")
    q_losses = [h["loss"] for h in q.state.log_history if "loss" in h]
    write(out, {"losses": losses, "files": files(out), "qlora_losses": q_losses, "keys": sorted(before),
                "resumed_step": resumed.state.global_step, "is_quantized": bool(quant.is_quantized)})


if __name__ == "__main__":
    main()
