"""Adapter paging (twinkle.model.paging): exact out -> in moves; and the pool
(twinkle.model.adapter_pool): slots, budget, idle unloading."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from model_test_utils import make_rows
from peft import LoraConfig
from twinkle.model.adapter_pool import AdapterPool, PoolFull, estimate_lora_bytes
from twinkle.model.paging import AdapterPager, PoolError
from twinkle.model.transformers_model import TransformersModel

LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


def _model(tiny_model_dir: str, names=("t1",), device: str = "cpu") -> TransformersModel:
    model = TransformersModel(model_id=tiny_model_dir, seed=0, device=device)
    for name in names:
        model.add_adapter_to_model(name, LORA)
        model.set_optimizer("AdamW", lr=1e-2, adapter_name=name)
    return model


def _step(model: TransformersModel, name: str, rows: list[dict]) -> float:
    model.forward_backward(inputs=rows, adapter_name=name)
    return model.clip_grad_and_step(adapter_name=name)["grad_norm"]


def _snapshot(model: TransformersModel, name: str) -> list[torch.Tensor]:
    state = model.state_of(name)
    out = [p.detach().clone() for p in state.params]
    for p in state.params:
        out += [v.clone() for _, v in sorted(state.optimizer.state.get(p, {}).items()) if torch.is_tensor(v)]
    return out


def _storages(model: TransformersModel, name: str) -> list[torch.Tensor]:
    """The adapter's tensors themselves (holding them keeps their memory from being reused)."""
    state = model.state_of(name)
    tensors = [p.data for p in state.params]
    for p in state.params:
        tensors += [v for _, v in sorted(state.optimizer.state[p].items())]
    return tensors


def test_training_after_page_out_and_in_is_bit_identical(tiny_model_dir):
    rows = make_rows(4, seed=3)
    plain = _model(tiny_model_dir)
    norms_plain = [_step(plain, "t1", rows) for _ in range(4)]

    paged = _model(tiny_model_dir)
    pager = AdapterPager(paged, copy_on_cpu=True)
    norms = [_step(paged, "t1", rows) for _ in range(2)]
    before = _snapshot(paged, "t1")
    old = _storages(paged, "t1")
    moved = pager.page_out("t1")
    assert pager.is_paged("t1") and moved == pager.adapter_bytes("t1") > 0
    # parameters and AdamW moments now live in the host block, not in their old storage
    block = pager.host_block("t1")
    start, end = block.data_ptr(), block.data_ptr() + block.numel()
    assert all(start <= p.data_ptr() < end for p in paged.state_of("t1").params)
    pager.page_in("t1")
    assert not pager.is_paged("t1")
    after = _storages(paged, "t1")
    assert all(x.data_ptr() != y.data_ptr() for x, y in zip(old, after)), "page-in must give fresh storage"
    assert all(not (start <= t.data_ptr() < end) for t in after)
    for x, y in zip(before, _snapshot(paged, "t1")):
        assert torch.equal(x, y)
    norms += [_step(paged, "t1", rows) for _ in range(2)]
    assert norms == norms_plain
    for x, y in zip(_snapshot(plain, "t1"), _snapshot(paged, "t1")):
        assert torch.equal(x, y)


def test_gradients_mid_window_are_paged_too(tiny_model_dir):
    rows = make_rows(4, seed=5)
    plain, paged = _model(tiny_model_dir), _model(tiny_model_dir)
    for model in (plain, paged):
        model.state_of("t1").gradient_accumulation_steps = 2
        model.forward_backward(inputs=rows[:2], adapter_name="t1")
    pager = AdapterPager(paged, copy_on_cpu=True)
    grads = [p.grad.clone() for p in paged.state_of("t1").params]
    pager.page_out("t1")
    assert all(p.grad is not None and p.grad.device.type == "cpu" for p in paged.state_of("t1").params)
    pager.page_in("t1")
    for g, p in zip(grads, paged.state_of("t1").params):
        assert torch.equal(g, p.grad)
    for model in (plain, paged):
        model.forward_backward(inputs=rows[2:], adapter_name="t1")
        assert model.clip_grad_and_step(adapter_name="t1")["stepped"]
    for x, y in zip(_snapshot(plain, "t1"), _snapshot(paged, "t1")):
        assert torch.equal(x, y)


def test_adding_an_adapter_leaves_paged_adapters_in_host_memory(tiny_model_dir):
    model = _model(tiny_model_dir)
    _step(model, "t1", make_rows(2))
    pager = AdapterPager(model, copy_on_cpu=True)
    pager.page_out("t1")
    block = pager.host_block("t1")
    start, end = block.data_ptr(), block.data_ptr() + block.numel()
    model.add_adapter_to_model("t2", LORA)
    assert all(start <= p.data_ptr() < end for p in model.state_of("t1").params)


def test_on_a_cpu_model_paging_is_bookkeeping_by_default(tiny_model_dir):
    model = _model(tiny_model_dir)
    pager = AdapterPager(model)
    _step(model, "t1", make_rows(2))
    ptrs = [t.data_ptr() for t in _storages(model, "t1")]
    assert not pager.moves and not pager.pins
    pager.reserve("t1", 1 << 20)
    assert pager.reserved_bytes("t1") == 1 << 20 and pager.host_block("t1") is None  # nothing allocated
    assert pager.page_out("t1") == 0 and pager.is_paged("t1")
    assert pager.page_in("t1") == 0 and not pager.is_paged("t1")
    assert [t.data_ptr() for t in _storages(model, "t1")] == ptrs


def test_estimate_matches_a_real_adapter(tiny_model_dir):
    model = _model(tiny_model_dir)
    params = model.state_of("t1").params
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    slack = 64 * len(params)  # per tensor: a fused optimizer's step count, alignment
    assert estimate_lora_bytes(model, 4, "all-linear", copies=1) == pytest.approx(param_bytes + slack, abs=64)
    assert estimate_lora_bytes(model, 4, ["q_proj", "v_proj"], copies=1) < param_bytes
    # page-out of a stepped AdamW adapter moves parameters + two moments (+ CPU step counters)
    _step(model, "t1", make_rows(2))
    pager = AdapterPager(model, copy_on_cpu=True)
    assert 3 * param_bytes <= pager.adapter_bytes("t1") <= 3 * param_bytes + 64 * len(params)


def test_pool_pages_least_recently_used_idle_adapters(tiny_model_dir):
    clock = [0.0]
    model = _model(tiny_model_dir, names=("t1", "t2", "t3"))
    pool = AdapterPool(model, slots=2, host_bytes_budget=1 << 30, clock=lambda: clock[0])
    for name in ("t1", "t2", "t3"):
        clock[0] += 1
        pool.add(name)
    # adding "t3" paged out the least recently used one ("t1")
    assert [pool.status(n) for n in ("t1", "t2", "t3")] == ["paged", "resident", "resident"]
    clock[0] += 1
    pool.touch("t2")
    clock[0] += 1
    pool.acquire(["t1"])  # "t3" is now the least recently used
    assert [pool.status(n) for n in ("t1", "t2", "t3")] == ["resident", "resident", "paged"]
    cap = pool.capacity()
    assert cap["slots"] == 2 and cap["resident"] == 2 and cap["paged"] == 1 and cap["free"] == 0
    assert cap["host_bytes_used"] == sum(pool.pager.reserved_bytes(n) for n in ("t1", "t2", "t3")) > 0
    assert cap["host_bytes_budget"] == 1 << 30
    # never page out a member of the pass being made resident
    clock[0] += 1
    pool.acquire(["t3", "t1"])
    assert pool.status("t2") == "paged" and pool.status("t1") == pool.status("t3") == "resident"
    with pytest.raises(PoolError, match="3 adapters on the device but the pool has 2 slots"):
        pool.acquire(["t1", "t2", "t3"])


def test_pinned_adapters_are_never_paged_out(tiny_model_dir):
    model = _model(tiny_model_dir, names=("t1", "t2"))
    pool = AdapterPool(model, slots=1, host_bytes_budget=1 << 30)
    pool.add("t1")
    pool.add("t2")
    with pool.use(["t2"]):
        with pytest.raises(PoolError, match="slots hold adapters of running passes"):
            pool.acquire(["t1"])
        pool.page_out("t2")
        assert pool.status("t2") == "resident"
    pool.acquire(["t1"])
    assert pool.status("t2") == "paged"


def test_pool_trains_several_adapters_through_one_slot_exactly(tiny_model_dir):
    rows = {"t1": make_rows(3, seed=1), "t2": make_rows(3, seed=2)}
    plain = _model(tiny_model_dir, names=("t1", "t2"))
    for _ in range(2):
        for name in ("t1", "t2"):
            _step(plain, name, rows[name])
    model = _model(tiny_model_dir, names=("t1", "t2"))
    pool = AdapterPool(model, slots=1, host_bytes_budget=1 << 30, pager=AdapterPager(model, copy_on_cpu=True))
    pool.add("t1")
    pool.add("t2")
    for _ in range(2):
        for name in ("t1", "t2"):
            with pool.use([name]):
                _step(model, name, rows[name])
    assert pool.stats["page_outs"] >= 3 and pool.stats["page_ins"] >= 3
    pool.acquire(["t1"])
    pool.acquire(["t2"])
    for name in ("t1", "t2"):
        for x, y in zip(_snapshot(plain, name), _snapshot(model, name)):
            assert torch.equal(x, y)


def test_admission_is_bounded_by_the_host_budget(tiny_model_dir):
    model = _model(tiny_model_dir, names=("t1",))
    one = estimate_lora_bytes(model, 4, "all-linear")
    pool = AdapterPool(model, slots=8, host_bytes_budget=2 * one + 10, idle_ttl_s=60)
    assert pool.can_admit(4, "all-linear")
    pool.add("t1")
    assert pool.can_admit(4, "all-linear") and not pool.can_admit(16, "all-linear")
    model.add_adapter_to_model("t2", LORA)
    pool.add("t2")
    assert not pool.can_admit(4, "all-linear")
    with pytest.raises(PoolFull, match=r"2 live adapters hold .* host-memory budget .* unloaded") as info:
        pool.check_admit(4, "all-linear")
    assert info.value.retry_after is not None and 1.0 <= info.value.retry_after <= 60
    model.add_adapter_to_model("t3", LORA)
    with pytest.raises(PoolFull):
        pool.add("t3")
    assert "t3" not in pool
    pool.remove("t2")
    pool.add("t3")
    assert pool.capacity()["host_bytes_used"] == 2 * one
    assert not pool.can_admit(nbytes=1, pending=0, pending_bytes=one)  # creations in flight count too
    pool.max_live = 2
    pool.host_bytes_budget = 100 * one
    with pytest.raises(PoolFull, match=r"2 live adapters, the pool's limit \(max_live\) is 2"):
        pool.check_admit(4, "all-linear")


def test_idle_adapters_are_unloaded_and_reloaded_on_use(tiny_model_dir, tmp_path):
    clock = [0.0]
    rows = make_rows(3, seed=4)
    model = _model(tiny_model_dir, names=("t1", "t2"))
    saved: dict[str, str] = {}

    def save(name: str) -> None:
        saved[name] = model.save(tmp_path / name, adapter_name=name, save_optimizer=True)

    def load(name: str) -> None:
        model.load(saved[name], adapter_name=name)
        model.set_optimizer("AdamW", lr=1e-2, adapter_name=name)
        model.resume_from_checkpoint(saved[name], adapter_name=name)

    pool = AdapterPool(
        model,
        slots=1,
        host_bytes_budget=1 << 30,
        idle_ttl_s=10,
        save=save,
        load=load,
        pager=AdapterPager(model, copy_on_cpu=True),
        clock=lambda: clock[0],
    )
    pool.add("t1")
    pool.add("t2")  # pages "t1" out
    with pool.use(["t1"]):
        _step(model, "t1", rows)
    weights = _snapshot(model, "t1")
    used = pool.capacity()["host_bytes_used"]
    clock[0] = 5
    pool.touch("t2")
    clock[0] = 12
    assert pool.idle() == ["t1"]
    pool.page_out("t1")  # unloading a paged adapter works too
    assert pool.reap_idle() == ["t1"]
    assert pool.status("t1") == "unloaded" and "t1" not in model.adapter_names
    cap = pool.capacity()
    assert cap["unloaded"] == 1 and cap["host_bytes_used"] < used
    pool.acquire(["t1"])  # reloaded through load()
    assert pool.status("t1") == "resident" and pool.stats["reloads"] == 1
    for x, y in zip(weights, _snapshot(model, "t1")):
        assert torch.equal(x, y)


@pytest.mark.parametrize("copy_on_cpu", [True, False], ids=["copying", "bookkeeping"])
def test_spilled_adapters_come_back_exactly_and_keep_training(tiny_model_dir, tmp_path, copy_on_cpu):
    rows = make_rows(3, seed=6)
    plain = _model(tiny_model_dir, names=("t1", "t2"))
    model = _model(tiny_model_dir, names=("t1", "t2"))
    clock = [0.0]
    pool = AdapterPool(
        model,
        slots=1,
        host_bytes_budget=1 << 30,
        idle_ttl_s=10,
        spill_dir=tmp_path / "spill",
        pager=AdapterPager(model, copy_on_cpu=copy_on_cpu),
        clock=lambda: clock[0],
    )
    pool.add("t1")
    pool.add("t2")
    for m in (plain, model):
        m.state_of("t1").gradient_accumulation_steps = 2
    for m, p in ((plain, None), (model, pool)):
        with pool.use(["t1"]) if p else contextlib.nullcontext():
            for _ in range(3):  # one step of two micro-batches, then gradients pending mid-window
                m.forward_backward(inputs=rows, adapter_name="t1")
                m.clip_grad_and_step(adapter_name="t1")
    used = pool.capacity()["host_bytes_used"]
    clock[0] = 20
    pool.touch("t2")
    assert pool.reap_idle() == ["t1"]
    assert pool.status("t1") == "unloaded" and "t1" in model.adapter_names  # still in the model
    assert len(list((tmp_path / "spill").iterdir())) == 1
    assert pool.capacity()["host_bytes_used"] < used
    assert all(p.untyped_storage().nbytes() <= 4 for p in model.state_of("t1").params)  # placeholders only
    with pool.use(["t1"]):
        assert pool.status("t1") == "resident" and pool.stats["reloads"] == 1
        assert not list((tmp_path / "spill").iterdir())
        for m in (plain, model):
            m.forward_backward(inputs=rows, adapter_name="t1")
            assert m.clip_grad_and_step(adapter_name="t1")["stepped"]
    for x, y in zip(_snapshot(plain, "t1"), _snapshot(model, "t1")):
        assert torch.equal(x, y)


def test_a_failing_save_keeps_the_adapter(tiny_model_dir):
    model = _model(tiny_model_dir, names=("t1", "t2"))

    def save(name: str) -> None:
        raise OSError("disk full")

    pool = AdapterPool(
        model,
        slots=1,
        host_bytes_budget=1 << 30,
        idle_ttl_s=1,
        save=save,
        load=lambda name: None,
        pager=AdapterPager(model, copy_on_cpu=True),
        clock=lambda: 100.0 if pool_ready else 0.0,
    )
    pool_ready = False
    pool.add("t1")
    pool.add("t2")
    pool_ready = True
    before = _snapshot(model, "t1")
    with pytest.raises(OSError, match="disk full"):
        pool.reap_idle()
    assert pool.status("t1") == "paged" and "t1" in model.adapter_names
    pool.acquire(["t1"])
    for x, y in zip(before, _snapshot(model, "t1")):
        assert torch.equal(x, y)


def test_pool_calls_from_threads_keep_counts_consistent(tiny_model_dir):
    model = _model(tiny_model_dir, names=("t1", "t2", "t3"))
    pool = AdapterPool(model, slots=2, host_bytes_budget=1 << 30)
    for name in ("t1", "t2", "t3"):
        pool.add(name)
    errors: list[BaseException] = []

    def work(names: list[str]) -> None:
        try:
            for _ in range(50):
                with pool.use(names):
                    assert all(pool.status(n) == "resident" for n in names)
                pool.capacity()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=([n],)) for n in ("t1", "t2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    cap = pool.capacity()
    assert cap["resident"] + cap["paged"] == 3 and cap["resident"] <= 2


@pytest.mark.gpu
def test_cuda_paging_uses_pinned_blocks_and_is_exact(tiny_model_dir):
    import time

    rows = make_rows(4, seed=3)
    model = _model(tiny_model_dir, device="cuda")
    _step(model, "t1", rows)
    pager = AdapterPager(model)
    assert pager.moves and pager.pins
    before = _snapshot(model, "t1")
    free_before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    moved = pager.page_out("t1")
    pager.synchronize("t1")
    out_s = time.perf_counter() - start
    assert pager.host_block("t1").is_pinned()
    assert all(p.device.type == "cpu" for p in model.state_of("t1").params)
    assert torch.cuda.memory_allocated() <= free_before - moved // 2
    model.add_adapter_to_model("t2", LORA)  # adding an adapter must not pull paged ones back to the GPU
    assert all(p.device.type == "cpu" for p in model.state_of("t1").params)
    start = time.perf_counter()
    pager.page_in("t1")
    torch.cuda.synchronize()
    in_s = time.perf_counter() - start
    assert all(p.device.type == "cuda" for p in model.state_of("t1").params)
    for x, y in zip(before, _snapshot(model, "t1")):
        assert torch.equal(x.cpu(), y.cpu())
    assert out_s < 5 and in_s < 5  # a tiny adapter: milliseconds (benchmarks/adapter_paging.py times a 7B one)
    _step(model, "t1", rows)
