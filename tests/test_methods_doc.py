"""docs/methods.md is generated from the recipes and the registry, and every row's measured count equals its
closed form (trainable parameters on a RoBERTa-base config)."""

from __future__ import annotations

import glob
import os

import pytest

from peftkit.counts import DOC_BEGIN, DOC_END, count, methods_doc, recipe_rows
from peftkit.counts_causal import causal_rows

ROOT = os.path.join(os.path.dirname(__file__), "..")
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "sst2_*.yaml")))


@pytest.fixture(scope="module")
def rows():
    return recipe_rows(RECIPES)


@pytest.fixture(scope="module")
def causal():
    return causal_rows(count)


def test_causal_lm_only_methods_measured_equals_closed_form_on_smollm2(causal):
    assert {r["method"] for r in causal} == {"cpt", "cartridge", "llama_adapter_v2", "shadow", "xlora"}
    for r in causal:
        assert r["trainable"] == r["closed_form"] > 0 and r["total"] == 134_515_008, r["example"]
    by = {r["example"]: r for r in causal}
    d, kv, f, layers = 576, 192, 1536, 30
    assert by["cpt"]["trainable"] == 5 * d  # a delta per in-context token
    assert by["cartridge"]["trainable"] == (4 - 1) * layers * 2 * kv  # one frozen token of 4; keys + values
    # peft's defaults: r = u = 8 per block, and the 1-block mirror sharing the base embeddings
    mirror = 2 * d * d + 2 * d * kv + 3 * d * f + 3 * d
    assert by["shadow (peft defaults)"]["trainable"] == layers * (2 * d * 8 + 2 * (2 * d * 8 + 8 + d)) + mirror
    assert by["xlora"]["trainable"] == 8 * (d + 1) + 2 * (8 + 1)
    # LLaMA-Adapter V2: 4 prompt tokens + a gate on the top layer, a bias and a scale on each of the 7 block linears'
    # outputs (q, o, down: d; k, v: kv; gate, up: f), a scale on every RMSNorm (2 per block and the final one)
    assert by["llama_adapter_v2"]["trainable"] == 4 * d + 1 + layers * 2 * (3 * d + 2 * kv + 2 * f) + (2 * layers + 1) * d  # the scaling head (depth 2) over 2 experts


def test_measured_equals_closed_form_on_roberta_base(rows):
    assert {r["method"] for r in rows} >= {"lora", "adalora", "vera", "loha", "lokr", "oft", "boft", "ia3", "ssf",
                                            "fourierft", "bitfit", "fish_mask"}
    for r in rows:
        assert r["trainable"] == r["closed_form"] > 0, r["recipe"]
    by_recipe = {r["recipe"]: r for r in rows}
    # hand-checked anchors: LoRA r=8 on 72 block linears + the pooler
    d, f = 768, 3072
    per_block = 4 * 8 * (d + d) + 8 * (d + f) + 8 * (f + d)
    assert by_recipe["sst2_lora.yaml"]["trainable"] == 12 * per_block + 8 * (d + d)
    # FISH at 0.5% keeps round(0.005 * N) of the 124,645,632 entries
    assert by_recipe["sst2_fish_mask.yaml"]["trainable"] == round(0.005 * 124_645_632)


def test_methods_doc_is_current(rows, causal):
    with open(os.path.join(ROOT, "docs", "methods.md"), encoding="utf-8") as f:
        text = f.read()
    block = text[text.index(DOC_BEGIN) + len(DOC_BEGIN) : text.index(DOC_END)].strip()
    expected = methods_doc(RECIPES, rows, causal)
    assert block == expected, "docs/methods.md is stale: python -m peftkit.counts configs/sst2_*.yaml"
