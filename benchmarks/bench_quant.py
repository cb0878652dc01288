"""Peak training memory of LoRA on a 4-bit (NF4, double quant) base against the same run on an fp32 base.

Each run is a fresh subprocess (one at a time) that reports its own peak RSS (``VmHWM``); the parent prints a table.

- ``llama-1b``: a Llama built from a config (hidden 2048, 16 layers, intermediate 5632, vocab 32000, 953M
  parameters, random weights), LoRA r=16 on every linear layer, batch 1 x seq 32, 3 AdamW steps. The 4-bit
  run builds the model on the meta device and materializes it one module at a time, packing each Linear
  before the next exists, so it never holds the fp32 model; lm_head stays fp32 (as transformers keeps it)
  and the frozen input embedding is bf16 (QLoRA keeps unquantized weights in its bf16 compute dtype).
- ``smollm2``: the real SmolLM2-135M-Instruct, LoRA r=8 on q/k/v/o, on examples/data/agnews_instruct
  (loss on the response only), batch 2, 30 steps, both runs with activation checkpointing and logits for
  the response tokens only (``peftkit.train.losses``); both read the fp32 safetensors one tensor at a time
  into the parameters (no memory map). The 4-bit run is QLoRA's set-up: each Linear packed to NF4 as it
  is read, bf16 compute, the unquantized weights (the embedding, tied to lm_head, and the norms) in bf16.
  Besides the raw peaks, the children report the RSS just before the weights exist (libraries, tokenizer,
  data, the model's code): the ratio above it is the memory the two runs themselves take.

    .venv/bin/python benchmarks/bench_quant.py [--only llama-1b smollm2] [--json docs/bench_quant.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as U  # noqa: E402

LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048)



def _materialize(model, fill, quant: bool, skip=(), leave=(), dtype=None):
    """Give every meta parameter of ``model`` its value in place (``fill(name, param)``), one module at a
    time, packing each ``nn.Linear`` to 4-bit right after its weight exists (unless its name is in
    ``skip``): at most one fp32 layer exists beside the packed ones, and no temporaries of its size.
    Modules named in ``leave`` stay on meta (a tied lm_head, tied after); ``dtype``: QLoRA's compute dtype,
    for the packed layers and every weight left unquantized."""
    import torch
    from torch import nn

    from peftkit.quant import _replace, quantize_linear

    for name, module in list(model.named_modules()):
        own = list(module.named_parameters(recurse=False))
        if not own or all(p.device.type != "meta" for _, p in own) or name in leave:
            continue
        if type(module) is nn.Linear:
            with torch.device("meta"):
                lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            lin.to_empty(device="cpu")
            with torch.no_grad():
                for pname, p in lin.named_parameters():
                    fill(f"{name}.{pname}", p)
            if quant and name not in skip:
                lin = quantize_linear(lin, 4, compute_dtype=dtype or torch.float32)
            elif dtype is not None:
                lin.to(dtype)
            _replace(model, name, lin)
        else:
            module.to_empty(device="cpu", recurse=False)
            with torch.no_grad():
                for pname, _ in own:
                    fill(f"{name}.{pname}", getattr(module, pname))
                    if dtype is not None:
                        setattr(module, pname, nn.Parameter(getattr(module, pname).to(dtype), requires_grad=False))


def run_llama_1b(quant: bool, steps: int = 3, quantize_head: bool = False) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from peftkit import LoraConfig

    config = LlamaConfig(**LLAMA_1B)
    gen = torch.Generator().manual_seed(0)

    def fill(name, p):  # Llama's init: N(0, 0.02) weights, ones for the norms
        p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=gen)

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    pre_weights = _rss_mb()
    _materialize(model, fill, quant, skip=() if quantize_head else ("lm_head",))
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were built on meta
    if quant:  # QLoRA keeps the weights it does not quantize in bf16: here the (frozen) input embedding
        model.model.embed_tokens.to(torch.bfloat16)
    out = _train_lm(model, config, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), steps,
                    batch=1, seq=32)
    return {**out, "pre_weights_mb": round(pre_weights, 1)}


def _train_lm(model, config, lora, steps, batch, seq, batches=None, lean: bool = False) -> dict:
    """``lean``: activation checkpointing per decoder layer and logits for the supervised tokens only."""
    import time

    import torch

    from peftkit import get_peft_model
    from peftkit.train.losses import supervised_lm_loss

    before = _rss_mb()
    pm = get_peft_model(model, lora)
    attach_mb = _rss_mb() - before  # no second copy of the base: about the adapter's own size
    pm.train()
    if lean:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-4)
    gen = torch.Generator().manual_seed(1)
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        if batches is None:
            ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
            inputs = {"input_ids": ids, "labels": ids}
        else:
            inputs = batches[step % len(batches)]
        loss = supervised_lm_loss(pm, inputs) if lean else pm(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    n = sum(p.numel() for p in pm.parameters())
    return {"peak_mb": U.peak_rss_kb() / 1024, "losses": losses,
            "s_per_step": (time.perf_counter() - t0) / steps, "params": n, "get_peft_model_mb": round(attach_mb, 1),
            "adapter_mb": round(sum(p.numel() for p in pm.parameters() if p.requires_grad) * 4 / 2**20, 1)}


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_smollm2(quant: bool, steps: int = 30) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from peftkit import LoraConfig
    from peftkit.train.models import smollm2_dir

    folder = smollm2_dir()
    config = AutoConfig.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    batches = _agnews_batches(tok, batch=2, n=steps)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    pre_weights = _rss_mb()  # libraries, tokenizer, data and the model's code: the same in both runs
    # read each tensor straight into its parameter with plain file reads: a memory map (safe_open) would put
    # the whole 540 MB file into this process's RSS while loading, for both runs
    with open(os.path.join(folder, "model.safetensors"), "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))

        def fill(name, p):
            meta = header[name if name in header else "model.embed_tokens.weight"]  # tied lm_head
            assert meta["dtype"] == "F32" and p.dtype == torch.float32, meta["dtype"]
            start, end = meta["data_offsets"]
            fh.seek(8 + n + start)
            fh.readinto(memoryview(p.detach().numpy()).cast("B")[: end - start])

        # QLoRA: NF4 storage, bf16 compute, the unquantized weights (embedding = tied lm_head, norms) in bf16
        if quant:  # oneDNN's bf16 matmul keeps a primitive (~1.7 MB) per new input shape: with each step's own
            torch.backends.mkldnn.enabled = False  # length, RSS grew ~8 MB a step; without it, ~8x slower steps
        _materialize(model, fill, quant, skip=("lm_head",), leave=("lm_head",) if config.tie_word_embeddings else (),
                     dtype=torch.bfloat16 if quant else None)
    model.tie_weights()
    emb = model.model.rotary_emb
    model.model.rotary_emb = type(emb)(config)
    out = _train_lm(model, config, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                    "o_proj"]),
                    steps, 2, 0, batches, lean=True)
    first, last = sum(out["losses"][:5]) / 5, sum(out["losses"][-5:]) / 5
    out.update(first5=round(first, 4), last5=round(last, 4), pre_weights_mb=round(pre_weights, 1))
    return out


def _agnews_batches(tok, batch: int, n: int) -> list[dict]:
    """Prompt + response rows of examples/data/agnews_instruct, the loss on the response tokens only."""
    import torch

    here = os.path.dirname(os.path.abspath(__file__))
    rows = [json.loads(line) for line in open(os.path.join(here, "..", "examples", "data", "agnews_instruct",
                                                           "train.jsonl"))][: batch * n]
    out = []
    for i in range(0, len(rows), batch):
        ids, labels = [], []
        for row in rows[i:i + batch]:
            p = tok(row["prompt"])["input_ids"][:96]
            r = tok(" " + row["response"] + tok.eos_token)["input_ids"]
            ids.append(p + r)
            labels.append([-100] * len(p) + r)
        width = max(map(len, ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        out.append({
            "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
        })
    return out


def runtime() -> dict:
    
    import importlib

    for name in ("bitsandbytes", "transformers", "peftkit.quant"):
        importlib.import_module(name)
    return {"peak_mb": U.peak_rss_kb() / 1024}


RUNS = {"llama-1b": run_llama_1b, "smollm2": run_smollm2}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2)
    parser.add_argument("--only", nargs="*", default=list(RUNS))
    parser.add_argument("--json")
    a = parser.parse_args()
    if a.child:
        import torch

        torch.set_num_threads(1)
        name, q = a.child
        if q == "4bit-head":  # variant: lm_head packed too (llama-1b only)
            print(json.dumps(run_llama_1b(True, quantize_head=True)))
            return
        print(json.dumps(runtime() if name == "runtime" else RUNS[name](q == "4bit")))
        return
    # glibc serves blocks from this size up with their own mapping, returned to the OS when freed (same for
    # both runs). Smaller blocks come from the heap, which keeps what is freed: the per-layer fp32 buffers of
    # the 4-bit build stayed behind the small packed tensors allocated after them (threshold 1 MB vs glibc's
    # default), and the (tokens x features) temporaries of steps with different lengths fragment it (128 KB
    # vs 1 MB: about 50 MB less in the SmolLM2 runs' first forward, the live tensors being the same)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072"))

    def child(name: str, q: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--child", name, q], capture_output=True, text=True, env=env)
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    base = child("runtime", "none")["peak_mb"]
    results = {"runtime_mb": round(base, 1)}
    print(f"runtime (imports only): {base:.0f} MB")
    print("| model | fp32 base MB | 4-bit base MB | ratio | ratio above runtime | losses fp32 / 4-bit |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in a.only:
        fp, q4 = child(name, "fp32"), child(name, "4bit")
        ratio, above = q4["peak_mb"] / fp["peak_mb"], (q4["peak_mb"] - base) / (fp["peak_mb"] - base)
        results[name] = {"fp32": fp, "4bit": q4, "ratio": round(ratio, 3), "ratio_above_runtime": round(above, 3)}
        if "pre_weights_mb" in fp:  # the run's own allocations: above the RSS just before the weights exist
            results[name]["ratio_training"] = round((q4["peak_mb"] - q4["pre_weights_mb"])
                                                    / (fp["peak_mb"] - fp["pre_weights_mb"]), 3)
            print(f"{name}: above the RSS before the weights: {results[name]['ratio_training']}")
        lf = fp.get("first5"), fp.get("last5")
        lq = q4.get("first5"), q4.get("last5")
        losses = f"{lf[0]} -> {lf[1]} / {lq[0]} -> {lq[1]}" if lf[0] else f"{fp['losses']} / {q4['losses']}"
        print(f"| {name} | {fp['peak_mb']:.0f} | {q4['peak_mb']:.0f} | {ratio:.3f} | {above:.3f} | {losses} |",
              flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
