"""The memory plan at full size (nodes/engine/memory_table.py): the real architectures built on
the meta device in the dtypes `precision=auto` gives each file set, planned against simulated
cards and hosts. No weight is allocated; what is asserted is the arithmetic the run uses."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from nodes.engine import memory
from nodes.engine import memory_table
from nodes.engine.memory.plan import (ALLOCATOR_SLACK_BYTES, DECODE_WORK_BYTES, MAX_PINNED_SHARE, MODE_ORDER,
                                      SAMPLING_WORK_BYTES, device_peak)

GIB = 1024 ** 3
README = Path(__file__).resolve().parents[2] / "README.md"
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def rows():
    return memory_table.plan_table()


@pytest.fixture(scope="module")
def sizes():
    return {fs.name: memory_table.model_sizes(fs, memory.resolve_precision("auto", CUDA, fs.stored, native=True))
            for fs in memory_table.FILE_SETS}


def test_pinning_is_counted_as_the_allocator_rounds_it_on_the_real_shapes():
    # Each pinned block is rounded up to a power of two: the bf16 FLUX transformer's 22.17 GiB
    # take 34.65 GiB page-locked (1.56x), T5-XXL's 8.87 GiB take 12.25 GiB (1.38x).
    bf16 = memory.resolve_precision("bf16", CUDA, native=True)
    s = memory_table.model_sizes(memory_table.FILE_SETS[1], bf16)
    assert round(s.transformer.weights / GIB, 2) == 22.17 and round(s.transformer.pinned / GIB, 2) == 34.65
    t5 = s.encoders[0]
    assert round(t5.weights / GIB, 2) == 8.87 and round(t5.pinned / GIB, 2) == 12.25
    assert memory.plan.pinned_block_bytes(3 * 1024 ** 2) == 4 * 1024 ** 2
    # A 64 GiB host may pin 32 GiB: the transformer's raw 22.17 GiB fit that, its pinned 34.65 do
    # not, so group offload streams it from pageable memory rather than pinning past half the RAM.
    plan = memory.plan_memory("group_offload", "auto", CUDA, s, free_bytes=8 * GIB,
                              host=memory.HostMemory(60 * GIB, 64 * GIB))
    assert plan.pin_budget_bytes == 32 * GIB and s.transformer.weights <= plan.pin_budget_bytes
    assert plan.pinned_bytes <= plan.pin_budget_bytes
    assert plan.pinned_bytes < s.transformer.pinned


def test_no_plan_exceeds_the_hosts_ram_or_its_pin_cap(rows):
    for r in rows:
        total = r.host_gib * GIB
        if r.plan is None:   # does not fit: said so, and the weights indeed exceed the RAM
            assert r.host_peak_bytes + memory_table.HOST_SYSTEM_BYTES > total and "fits:" in r.advice
            continue
        assert r.host_peak_bytes + memory_table.HOST_SYSTEM_BYTES <= total, r
        assert r.plan.pinned_bytes <= r.plan.pin_budget_bytes <= total * MAX_PINNED_SHARE, r


def test_each_rows_mode_is_the_fastest_that_fits(rows, sizes):
    by_name = {fs.name: fs for fs in memory_table.FILE_SETS}
    candidates = [("gpu", "resident"), ("gpu", "offload"), ("model_offload", "offload"), ("group_offload", "offload")]
    for r in rows:
        if r.plan is None:
            continue
        free = r.card_gib * GIB - memory_table.CUDA_CONTEXT_BYTES
        chosen = candidates.index((r.plan.mode, r.plan.encoders))
        assert r.plan.fits and r.plan.device_peak_bytes <= free, r
        # A row `auto` stored as fp8 to fit is planned at that precision's sizes.
        at = memory_table.model_sizes(by_name[r.file_set], r.precision) if r.stored_fp8 else sizes[r.file_set]
        for faster in candidates[:chosen]:
            assert device_peak(*faster, at) > free, (r, faster)
        assert MODE_ORDER.index(r.plan.mode) == chosen - (chosen > 0)


def test_the_default_file_on_a_16_gb_card_samples_with_the_transformer_resident(rows, sizes):
    # fp8 stays fp8 under auto: the all-in-one's transformer is 11.7 GiB (not 22.2 in bf16).
    fp8 = sizes["fp8 all-in-one"]
    assert 11 * GIB < fp8.transformer.weights < 12 * GIB and fp8.quantized
    row = next(r for r in rows if (r.file_set, r.card_gib, r.host_gib) == ("fp8 all-in-one", 16, 32))
    assert row.plan.mode == "model_offload"
    assert row.plan.device_peak_bytes == fp8.transformer.weights + SAMPLING_WORK_BYTES + ALLOCATOR_SLACK_BYTES
    # The decode's 3 GiB beside the transformer (as before) would not have fitted: group offload.
    assert fp8.transformer.weights + SAMPLING_WORK_BYTES + DECODE_WORK_BYTES + ALLOCATOR_SLACK_BYTES > \
        16 * GIB - memory_table.CUDA_CONTEXT_BYTES


def test_the_default_file_fits_a_32_gb_host_and_bf16_split_files_are_stored_as_fp8_there(rows):
    by = {(r.file_set, r.card_gib, r.host_gib): r for r in rows}
    assert all(by[("fp8 all-in-one", c, 32)].fits for c in memory_table.CARDS_GIB)
    assert all(by[("bf16 split", c, 32)].fits and by[("bf16 split", c, 32)].stored_fp8 == "transformer"
               for c in memory_table.CARDS_GIB)
    bf16 = by[("bf16 split", 24, 16)]   # not even fp8 storage fits a 16 GB host: said so, with what would
    assert bf16.plan is None and bf16.advice == "fits: a 32 GB host" and not bf16.stored_fp8


def test_gguf_block_sizes_are_ggmls():
    gguf = pytest.importorskip("gguf")
    for name, blocks in memory_table.GGUF_BLOCKS.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == blocks


def test_readme_plan_table_is_what_the_code_computes(rows):
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- plan-table -->\n(.*?)<!-- /plan-table -->", text, re.S)
    assert found, "README lacks the plan table markers"
    assert found.group(1) == memory_table.markdown(rows)


def test_the_command_line_prints_the_plan_table(rows, capsys):
    from nodes.cli import command

    assert command.main(["--plan"]) == 0
    assert capsys.readouterr().out == memory_table.markdown(rows)


def test_the_command_line_prints_the_mac_table_for_mps(capsys):
    from nodes.cli import command

    assert command.main(["--plan", "--device", "mps"]) == 0
    assert capsys.readouterr().out == memory_table.mac_markdown(memory_table.mac_plan_table())


def test_the_plan_is_logged_when_the_models_load(caplog):
    from nodes.engine import EngineOptions, USOPipeline
    from nodes.engine.random_models import build_random_models

    with caplog.at_level("INFO", logger="uso.engine"):
        pipe = USOPipeline(build_random_models("tiny"), EngineOptions(device="cpu", memory="model_offload"))
    lines = [r.getMessage() for r in caplog.records if r.name == "uso.engine"]
    assert lines == [f"memory plan: {pipe.memory_plan.summary()}"]
    assert lines[0].startswith("memory plan: memory=model_offload, encoders=offload: device peak")
