"""Per-call routing (``adapter_names``) is per call: request threads sharing one model each get their own rows'
adapters, never another call's, with or without ``adapter_names``, in ``forward`` and ``generate``."""

from __future__ import annotations

import threading

import torch

from peftkit import LoraConfig, get_peft_model

from .families import FAMILY, V

BASE = "__base__"
CALLS = 100


def _model():
    """Tiny Llama with two LoRA adapters whose (seeded) weights are all non-zero."""
    torch.manual_seed(0)
    model = get_peft_model(FAMILY["llama"].model(), LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear"))
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, adapter in model.base_model.adapters():
            for p in adapter.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


# each thread: its own rows' adapters (None: the active adapter, no routing) and its own batch size
PATTERNS = [
    ["default", "other", BASE],
    ["other", "other"],
    None,
    [BASE, "default", "other", "default", BASE],
]


def _inputs(i: int, rows: int) -> torch.Tensor:
    return torch.randint(0, V, (rows, 5), generator=torch.Generator().manual_seed(10 + i))


def _run_threads(work, n: int) -> list[BaseException]:
    """``work(i)`` in ``n`` threads started together; the exceptions they raised."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def target(i: int) -> None:
        # one OpenMP thread: libgomp starts a thread team per calling thread, and a sandbox may refuse threads
        torch.set_num_threads(1)
        try:
            barrier.wait()
            work(i)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_mixed_batches_get_their_own_adapters():
    model = _model()
    batches = [(names, _inputs(i, len(names) if names else 2)) for i, names in enumerate(PATTERNS)]
    with torch.no_grad():
        expected = [model(input_ids=ids, adapter_names=names).logits for names, ids in batches]
        # the patterns' rows differ (so a call that got another call's adapters would show)
        assert (expected[0][0] - expected[0][1]).abs().max() > 1e-2
        assert (expected[0][1] - expected[0][2]).abs().max() > 1e-2
    wrong: list[tuple[int, int, float]] = []

    @torch.no_grad()
    def work(i: int) -> None:
        names, ids = batches[i]
        for call in range(CALLS):
            got = model(input_ids=ids, adapter_names=names).logits
            err = (got - expected[i]).abs().max().item()
            if err > 1e-6:
                wrong.append((i, call, err))

    errors = _run_threads(work, len(batches))
    assert not errors, f"{len(errors)} calls raised, first: {errors[0]!r}"
    assert not wrong, f"{len(wrong)} of {CALLS * len(batches)} calls got other rows' adapters, first: {wrong[0]}"
    assert all(layer.routing is None for _, layer in model.base_model.adapter_layers())


def test_concurrent_generate_with_adapter_names():
    model = _model()
    model.get_base_model().generation_config.pad_token_id = 0
    jobs = [(["other", "default"], _inputs(0, 2)), (["default", BASE, "other"], _inputs(1, 3)), (None, _inputs(2, 2))]
    kw = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        expected = [model.generate(input_ids=ids, adapter_names=names, **kw) for names, ids in jobs]
        # each row generates what it generates alone with its adapter
        model.set_adapter("other")
        alone = model.generate(input_ids=jobs[0][1][:1], **kw)
        model.set_adapter("default")
        torch.testing.assert_close(expected[0][:1], alone)
    wrong: list[tuple[int, int]] = []

    @torch.no_grad()
    def work(i: int) -> None:
        names, ids = jobs[i]
        for call in range(8):
            if not torch.equal(model.generate(input_ids=ids, adapter_names=names, **kw), expected[i]):
                wrong.append((i, call))

    errors = _run_threads(work, len(jobs))
    assert not errors, f"{len(errors)} calls raised, first: {errors[0]!r}"
    assert not wrong, f"generate calls with other rows' adapters: {wrong}"


def test_unrouted_call_compiles_without_graph_breaks_while_another_thread_routes():
    """torch.compile traces the routing lookup: a compiled unrouted call made while another thread is inside a
    routed call has no graph break and that thread's routing does not leak into it."""
    family = FAMILY["bert"]
    model = get_peft_model(family.model(), LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear"))
    model.add_adapter("other", LoraConfig(r=2, init_lora_weights=False, target_modules="all-linear"))
    model.eval()
    inputs = family.inputs()
    with torch.no_grad():
        plain = model(**inputs).logits
    entered, leave = threading.Event(), threading.Event()

    def hold_a_route() -> None:
        torch.set_num_threads(1)
        with model.base_model.route(["other", BASE]):
            entered.set()
            leave.wait(timeout=600)

    holder = threading.Thread(target=hold_a_route)
    holder.start()
    try:
        assert entered.wait(timeout=60)
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(**inputs)
            compiled = torch.compile(model)(**inputs).logits
    finally:
        leave.set()
        holder.join()
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    torch.testing.assert_close(compiled, plain, atol=1e-5, rtol=1e-5)


def test_a_routed_call_routes_only_its_own_model():
    """Another model called inside a routed block (same thread) runs unrouted; nested routes each apply to their
    own model."""
    first, second = _model(), _model()
    ids = _inputs(0, 2)
    with torch.no_grad():
        plain = second(input_ids=ids).logits
        routed_second = second(input_ids=ids, adapter_names=[BASE, "other"]).logits
        routed_first = first(input_ids=ids, adapter_names=["other", BASE]).logits
        with first.base_model.route(["other", BASE]):
            torch.testing.assert_close(second(input_ids=ids).logits, plain, atol=1e-6, rtol=0)
            torch.testing.assert_close(second(input_ids=ids, adapter_names=[BASE, "other"]).logits, routed_second,
                                       atol=1e-6, rtol=0)
            torch.testing.assert_close(first(input_ids=ids).logits, routed_first, atol=1e-6, rtol=0)
        torch.testing.assert_close(first(input_ids=ids, adapter_names=["other", BASE]).logits, routed_first,
                                   atol=1e-6, rtol=0)
