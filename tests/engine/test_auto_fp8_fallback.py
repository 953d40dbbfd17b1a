"""Under `precision=auto`, 16-bit weights that fit nowhere are stored as fp8 (nodes/engine/memory/
fit.py): at full size on meta tensors against simulated hosts and cards, and on tiny real files
through the real load path with the host's RAM imitated."""
from __future__ import annotations

import logging

import pytest
import torch

import random_pipelines
from nodes.engine import EngineOptions, USOPipeline, fp8, memory, memory_table
from nodes.engine.memory import fit
from nodes.engine.model_set import ModelFiles, file_storage, fitted_precision, load_models, planned_sizes

GIB = 1024 ** 3
CUDA, CPU = torch.device("cuda"), torch.device("cpu")
SPLIT = memory_table.FILE_SETS[1]          # bf16 split: flux1-dev.safetensors + t5xxl_fp16
FP8_REL_TOL = 0.05                         # as tests/engine/test_memory_modes.py


@pytest.fixture(scope="module")
def split_sizes():
    cache = {}

    def sizes_of(precision):
        if precision not in cache:
            cache[precision] = memory_table.model_sizes(SPLIT, precision)
        return cache[precision]
    return sizes_of


def _fit(asked, card_gib, host_gib, sizes_of, device=CUDA):
    precision = memory.resolve_precision(asked, device, SPLIT.stored, native=True)
    return fit.fit_precision(asked, device, precision, sizes_of, card_gib * GIB - memory_table.CUDA_CONTEXT_BYTES,
                             memory_table.simulated_host(host_gib))


def test_bf16_split_files_on_a_32_gb_host_are_stored_as_fp8_and_fit(split_sizes):
    for card in (12, 16, 24):
        chosen = _fit("auto", card, 32, split_sizes)
        assert chosen.fits and chosen.precision.fp8_storage and chosen.stored_fp8 == "transformer"
        assert chosen.precision.compute == torch.bfloat16 and chosen.precision.t5_storage is None
        assert chosen.note.startswith("transformer stored as fp8 to fit: 32.0 GiB host RAM")
        # The bf16 weights alone exceed what the 32 GB host has left after the system and the process.
        bf16 = split_sizes(memory.resolve_precision("auto", CUDA, SPLIT.stored, native=True))
        assert bf16.total_bytes > memory_table.simulated_host(32).available >= chosen.host_bytes
    rows = {(r.file_set, r.card_gib, r.host_gib): r for r in memory_table.plan_table(cards=(24,), hosts=(32, 64))}
    row = rows[("bf16 split", 24, 32)]
    assert row.fits and row.precision.fp8_storage and row.stored_fp8 == "transformer"
    assert memory_table.cell(row).endswith("; transformer as fp8")
    assert row.host_peak_bytes + memory_table.HOST_SYSTEM_BYTES <= 32 * GIB


def test_bf16_split_files_that_fit_stay_bf16(split_sizes):
    chosen = _fit("auto", 48, 64, split_sizes)
    assert chosen.fits and not chosen.precision.fp8_storage and chosen.precision.t5_storage is None
    assert chosen.note == "" and chosen.stored_fp8 == "" and chosen.plan.mode == "gpu"
    # On smaller cards a 64 GB host streams the bf16 transformer (group offload fits): still bf16.
    assert not _fit("auto", 16, 64, split_sizes).precision.fp8_storage


def test_explicit_bf16_is_honoured_and_the_note_says_what_would_fit(split_sizes):
    chosen = _fit("bf16", 24, 32, split_sizes)
    assert not chosen.fits and not chosen.precision.fp8_storage and chosen.precision.compute == torch.bfloat16
    assert chosen.note.startswith("precision='bf16' does not fit: 32.0 GiB host RAM")
    assert chosen.note.endswith("precision 'auto' would store the transformer as fp8 and fit")


def test_the_cpu_keeps_fp32_and_reads_no_size():
    def sizes_of(_precision):
        raise AssertionError("no fit decision on the CPU")
    chosen = _fit("auto", 8, 16, sizes_of, CPU)
    assert chosen.precision.compute == torch.float32 and not chosen.precision.fp8_storage
    assert chosen.note == "" and chosen.plan is None


def _toy_sizes(p):
    """Sizes where only both in fp8 fit a 16 GB host with 9 GiB available: a 10 GiB bf16
    transformer (5 in fp8) and a 6 GiB T5 (3 in fp8)."""
    t = memory.ModuleSize(*(3 * [5 * GIB if p.fp8_storage else 10 * GIB]))
    t5 = memory.ModuleSize(*(3 * [3 * GIB if p.t5_storage == torch.float8_e4m3fn else 6 * GIB]))
    return memory.ModelSizes(t, memory.ModuleSize(0, 0, 0), (t5,), p.fp8_storage)


def test_t5_follows_when_the_transformer_alone_is_not_enough():
    # Sizes chosen so that only both in fp8 fit: 10 (bf16 transformer) + 6 (T5) GiB.
    precision = memory.resolve_precision("auto", CUDA, SPLIT.stored, native=True)
    chosen = fit.fit_precision("auto", CUDA, precision, _toy_sizes, 40 * GIB, memory.HostMemory(9 * GIB, 16 * GIB))
    assert chosen.stored_fp8 == "transformer and T5" and chosen.precision.t5_storage == torch.float8_e4m3fn
    assert chosen.host_bytes == 8 * GIB


def _split_files(tm):
    p = {k: str(v) for k, v in tm.paths.items()}
    return ModelFiles(transformer=p["flux_bfl"], vae=p["ae"], t5=p["t5_fp16"], clip_l=p["clip_l"],
                      siglip=p["siglip_file"], uso_lora=p["lora_comfy"], projector=p["projector_comfy"],
                      tokenizer_dir=str(tm.paths["tokenizer_t5"].parent))


def test_planned_sizes_are_what_the_loaders_make(tiny_models):
    # Counted from the headers before loading, within 15% of the loaded models (T5's `wo`, the
    # LoRA's shared down weights and SigLIP's dropped layer are counted as the files hold them).
    files = _split_files(tiny_models)
    stored = file_storage(files)
    for asked in ("bf16", "fp8_e4m3fn"):
        precision = memory.resolve_precision(asked, CUDA, stored, native=True)
        planned = planned_sizes(files, precision, stored)
        pipe = USOPipeline(load_models(files, precision), EngineOptions(device="cpu", precision=asked))
        real = memory.ModelSizes.of(pipe.transformer, pipe.vae, [pipe.t5, pipe.clip, pipe.siglip, pipe.projector],
                                    pipe._quantized())
        assert planned.transformer.weights == pytest.approx(real.transformer.weights, rel=0.02), asked
        assert planned.total_bytes == pytest.approx(real.total_bytes, rel=0.15), asked
        assert planned.quantized == real.quantized


def test_tiny_files_stored_as_fp8_to_fit_load_and_sample_within_the_fp8_tolerance(tiny_models, monkeypatch, caplog):
    files = _split_files(tiny_models)
    stored = file_storage(files)
    bf16 = planned_sizes(files, memory.resolve_precision("auto", CUDA, stored, native=True), stored)
    # A host whose RAM holds the fp8 transformer but not the bf16 one; a card with room for all.
    host = memory.HostMemory(bf16.total_bytes - bf16.transformer.weights // 4, 64 * GIB)
    chosen = fitted_precision(files, "auto", CUDA, 40 * GIB, host, native=True)
    assert chosen.precision.fp8_storage and chosen.stored_fp8 == "transformer" and chosen.fits

    # The real path: `from_files` loads in what the decision gives (here the decision on the
    # imitated CUDA card and host, as `fitted_precision` made it above) and logs why.
    from nodes.engine import pipeline as pipeline_module
    asked = []
    monkeypatch.setattr(pipeline_module, "fitted_precision",
                        lambda f, precision, device, free, host_now, encoders, facts=None: asked.append(precision) or chosen)
    with caplog.at_level(logging.WARNING, logger="uso.engine"):
        pipe = USOPipeline.from_files(files, EngineOptions(device="cpu"))
    assert asked == ["auto"]
    assert any(r.getMessage().startswith("precision: transformer stored as fp8 to fit") for r in caplog.records)
    assert pipe.precision.fp8_storage and pipe.lora_mode == "unfused"
    stored_fp8 = [m for m in pipe.transformer.modules() if isinstance(m, fp8.UpcastLinear)]
    assert stored_fp8 and all(m.weight.dtype == torch.float8_e4m3fn for m in stored_fp8)
    fp8_latents = random_pipelines.run(pipe)
    monkeypatch.undo()
    bf16_pipe = USOPipeline.from_files(files, EngineOptions(device="cpu", precision="bf16"))
    bf16_latents = random_pipelines.run(bf16_pipe)
    rel = ((fp8_latents.float() - bf16_latents.float()).abs().mean() / bf16_latents.float().std()).item()
    assert 0 < rel < FP8_REL_TOL


def test_on_an_fp16_card_the_fallback_computes_in_fp16_and_t5_in_fp32():
    # T4-class card (bf16 only emulated): the same decision, with the card's compute dtypes.
    precision = memory.resolve_precision("auto", CUDA, SPLIT.stored, native=False)
    assert precision.t5_storage == torch.float16 and precision.text == torch.float32
    one = fit.fit_precision("auto", CUDA, precision, _toy_sizes, 40 * GIB, memory.HostMemory(12 * GIB, 16 * GIB))
    assert one.stored_fp8 == "transformer" and one.precision.compute == torch.float16
    assert one.precision.t5_storage == torch.float16
    both = fit.fit_precision("auto", CUDA, precision, _toy_sizes, 40 * GIB, memory.HostMemory(9 * GIB, 16 * GIB))
    assert both.stored_fp8 == "transformer and T5" and both.precision.text == torch.float32
    assert both.precision.t5_storage == torch.float8_e4m3fn


@pytest.mark.parametrize("kind, stores_fp8", [("cuda", True), ("rocm", True), ("mps", False), ("xpu", False),
                                              ("directml", False), ("cpu", False)])
def test_fp8_storage_to_fit_only_on_nvidia_and_amd_cards(split_sizes, kind, stores_fp8):
    # The same bf16 split files and 32 GB host: an NVIDIA or AMD card stores the transformer as fp8
    # to fit; a Mac, an Intel GPU, DirectML or the CPU load what the files store.
    facts = memory.DeviceFacts.of_kind(kind, total_bytes=24 * GIB, native_bf16=True)
    device = facts.torch_device
    precision = memory.resolve_precision("auto", device, SPLIT.stored, facts=facts)
    chosen = fit.fit_precision("auto", device, precision, split_sizes, 24 * GIB - memory_table.CUDA_CONTEXT_BYTES,
                               memory_table.simulated_host(32), facts=facts)
    assert chosen.precision.fp8_storage is stores_fp8
    assert (chosen.stored_fp8 == "transformer") is stores_fp8


def test_no_fp8_fallback_where_the_device_cannot_hold_float8():
    facts = memory.DeviceFacts.of_kind("cuda", total_bytes=24 * GIB, fp8_storage=False)
    assert not fit.holds_fp8(CUDA, facts) and fit.holds_fp8(CUDA, memory.DeviceFacts.of_kind("cuda"))
