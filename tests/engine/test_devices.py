"""Every device ComfyUI runs on, imitated on the CPU (nodes/engine/memory/device_facts.py): the
precision `auto` picks, the memory plan for the full-size models built on the meta device, where
the position embedding and the noise are computed, and the out-of-memory guard. Each device is
imitated by its `DeviceFacts` (what ComfyUI's model_management, or torch, says about it)."""
from __future__ import annotations

from dataclasses import replace

import random_pipelines
import pytest
import torch

from nodes.engine import EngineOptions, USOPipeline, memory, memory_table, positions, sampler
from nodes.engine.errors import InputError, OutOfMemoryError
from nodes.engine.memory import DeviceFacts, device_facts
from nodes.engine.memory.device_facts import UNIFIED_SYSTEM_BYTES, mac_bf16, rocm_native_bf16
from nodes.engine.memory.placement import Placement, is_out_of_memory
from nodes.engine.memory.precision import FileStorage
from nodes.engine.random_models import build_random_models
from reference_math import reference_noise

GIB = 1024 ** 3
MPS, CUDA = torch.device("mps"), torch.device("cuda")
FP8_FILES = memory_table.FILE_SETS[0]
BF16_FILES = memory_table.FILE_SETS[1]


def mac(ram_gib: int, macos14: bool = True) -> DeviceFacts:
    return DeviceFacts.of_kind("mps", total_bytes=ram_gib * GIB, native_bf16=macos14)


def card(kind: str = "cuda", gib: float = 24, native: bool = True, **forced) -> DeviceFacts:
    return DeviceFacts.of_kind(kind, total_bytes=int(gib * GIB), free_bytes=int((gib - 0.5) * GIB),
                               native_bf16=native, **forced)


@pytest.fixture(scope="module")
def bf16_sizes():
    return memory_table.model_sizes(BF16_FILES, memory.resolve_precision("auto", CUDA, BF16_FILES.stored,
                                                                         native=True))


# -- native bf16 -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, native", [
    ("gfx90a:sramecc+:xnack-", True), ("gfx942", True), ("gfx950", True), ("gfx1100", True), ("gfx1151", True),
    ("gfx1201", True), ("gfx1030", False), ("gfx1031", False), ("gfx1010", False), ("gfx906", False),
    ("gfx900", False), ("gfx803", False)])
def test_amd_bf16_is_native_on_rdna3_and_cdna2_and_newer_only(arch, native):
    assert rocm_native_bf16(arch) is native


@pytest.mark.parametrize("version, bf16", [((13, 6, 7), False), ((14, 0), True), ((15, 1), True), (None, False)])
def test_mps_runs_bf16_from_macos_14(version, bf16):
    assert mac_bf16(version) is bf16


@pytest.mark.parametrize("arch, compute", [("gfx1100", torch.bfloat16), ("gfx1030", torch.float16)])
def test_amd_auto_precision_follows_the_architecture(arch, compute):
    facts = card("rocm", native=rocm_native_bf16(arch))
    assert memory.resolve_precision("auto", CUDA, BF16_FILES.stored, facts=facts).compute == compute


def test_amd_vae_attention_is_not_sdpa_and_nvidias_is():
    assert not card("rocm").vae_sdpa and card("cuda").vae_sdpa


# -- Apple Silicon -----------------------------------------------------------------------------

def test_mac_auto_is_bf16_on_macos_14_fp16_before_with_t5_in_fp16_on_the_cpu():
    p14 = memory.resolve_precision("auto", MPS, BF16_FILES.stored, facts=mac(64))
    p13 = memory.resolve_precision("auto", MPS, BF16_FILES.stored, facts=mac(64, macos14=False))
    assert (p14.compute, p13.compute) == (torch.bfloat16, torch.float16)
    assert p14.text == p13.text == torch.float16 and p14.t5_storage is None
    assert mac(64).text_device == "cpu"


def test_mac_explicit_bf16_is_honoured_where_macos_has_it():
    assert memory.resolve_precision("bf16", MPS, facts=mac(32)).compute == torch.bfloat16
    assert memory.resolve_precision("bf16", MPS, facts=mac(32, macos14=False)).compute == torch.float16


def test_mac_fp16_attention_black_from_macos_14_5_forced_fp16_computes_in_bf16_named_fp16_refused():
    late = DeviceFacts.of_kind("mps", total_bytes=64 * GIB, native_bf16=True, fp16_attention_fails=True)
    early = DeviceFacts.of_kind("mps", total_bytes=64 * GIB, native_bf16=True)   # macOS 14.0-14.4
    forced = memory.resolve_precision("auto", MPS, BF16_FILES.stored, facts=replace(late, unet_dtype=torch.float16))
    assert forced.compute == torch.bfloat16
    with pytest.raises(InputError) as err:
        memory.resolve_precision("fp16", MPS, facts=late)
    assert str(err.value).startswith("precision: 'fp16' attention gives black images") and "'bf16'" in str(err.value)
    assert memory.resolve_precision("fp16", MPS, facts=early).compute == torch.float16


@pytest.mark.parametrize("version, fails", [((14, 4, 1), False), ((14, 5), True), ((15, 1), True), ((13, 6), False)])
def test_probing_a_mac_reads_the_fp16_attention_rule_from_its_macos(monkeypatch, version, fails):
    monkeypatch.setattr(device_facts, "mac_version", lambda: version)
    facts = DeviceFacts.probe("mps")
    assert facts.fp16_attention_fails is fails and facts.native_bf16 is (version >= (14,))


def test_fp8_is_refused_on_mps_and_directml_naming_precision_and_what_to_choose():
    for facts in (mac(64), DeviceFacts.of_kind("directml")):
        with pytest.raises(InputError) as err:
            memory.resolve_precision("fp8_e4m3fn", facts.torch_device, facts=facts)
        assert str(err.value).startswith("precision: 'fp8_e4m3fn'") and "choose precision 'auto'" in str(err.value)


def test_an_fp8_file_is_upcast_on_a_mac():
    p = memory.resolve_precision("auto", MPS, FP8_FILES.stored, facts=mac(64))
    assert not p.fp8_storage and p.t5_storage is None and p.compute == torch.bfloat16


def test_unified_memory_is_counted_once(bf16_sizes):
    # On a 64 GB Mac the free figure read after loading (~64 - 42 GiB) would pick group offload;
    # the plan uses the one pool instead: everything stays on the device.
    plan = memory.plan_memory("auto", "auto", MPS, bf16_sizes, free_bytes=22 * GIB, facts=mac(64))
    assert (plan.mode, plan.encoders, plan.fits) == ("gpu", "resident", True)
    assert plan.host_bytes == bf16_sizes.total_bytes and plan.pinned_bytes == 0
    assert "one pool" in plan.reason
    assert not memory.plan_memory("auto", "auto", MPS, bf16_sizes, facts=mac(32)).fits
    assert DeviceFacts.of_kind("mps", total_bytes=64 * GIB).plan_free_bytes() == 64 * GIB - UNIFIED_SYSTEM_BYTES


def test_the_mac_plan_never_recommends_fp8(bf16_sizes):
    plan = memory.plan_memory("auto", "auto", MPS, bf16_sizes, facts=mac(16))
    assert "fp8" not in plan.reason.replace("fp8 weights", "") and "GGUF" in plan.reason
    assert "fp8_e4m3fn" in memory.plan_memory("auto", "auto", CUDA, bf16_sizes, facts=card(gib=16)).reason


def test_mac_table_rows():
    rows = {(r.file_set, r.card_gib): r for r in memory_table.mac_plan_table()}
    assert not any(rows[(fs.name, 16)].fits for fs in memory_table.FILE_SETS)
    assert rows[("GGUF Q4_K", 32)].fits and not rows[("bf16 split", 32)].fits
    assert all(rows[(fs.name, m)].fits for fs in memory_table.FILE_SETS for m in (64, 128))
    assert rows[("bf16 split", 32)].advice == "fits: GGUF Q4_K, a 64 GB Mac"


def test_readme_mac_table_is_what_the_code_computes():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- mac-plan-table -->\n(.*?)<!-- /mac-plan-table -->", text, re.S)
    assert found and found.group(1) == memory_table.mac_markdown(memory_table.mac_plan_table())


def test_model_offload_on_unified_memory_keeps_no_second_host_copy():
    for unified, copies in ((True, 0), (False, 2)):
        placement = Placement("model_offload", torch.device("meta"), unified=unified)
        placement.setup(torch.nn.Linear(4, 4), [torch.nn.Linear(4, 4)])
        assert len(placement._host) == copies
        if unified:   # the whole module moves, no host copy is made (meta cannot give weights back: kept)
            module = torch.nn.Linear(2, 2)
            with placement.use(module, keep=True):
                assert module.weight.device.type == "meta"
            assert placement._host == {}


def test_mps_out_of_memory_is_caught_and_the_message_does_not_suggest_fp8():
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 17.02 GB, other "
                                         "allocations: 1.2 GB, max allowed: 18.13 GB)"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    pipe = USOPipeline(build_random_models("tiny", dtype=torch.bfloat16),
                       EngineOptions(device="cpu", precision="bf16",
                                     facts=DeviceFacts.of_kind("mps", "cpu", 32 * GIB)))

    def oom():
        raise RuntimeError("MPS backend out of memory (MPS allocated: 17.02 GB)")

    with pytest.raises(OutOfMemoryError) as err:
        pipe._guarded("sampling", oom)
    assert "fp8" not in str(err.value)
    with pytest.raises(ValueError):
        pipe._guarded("sampling", lambda: (_ for _ in ()).throw(ValueError("not memory")))


def test_auto_device_is_cuda_then_mps_then_xpu_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert memory.resolve_device("auto") == MPS and memory.resolve_device(None) == MPS
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    assert memory.resolve_device(None) == torch.device("xpu")
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert memory.resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert memory.resolve_device(None) == CUDA


def test_an_mps_device_gets_the_memory_check(monkeypatch, bf16_sizes):
    """`--device mps`: probed from the host's RAM (one pool), not left unchecked."""
    facts = DeviceFacts.probe(MPS)
    assert facts.unified and facts.total_bytes is not None
    small = DeviceFacts.of_kind("mps", total_bytes=24 * GIB)
    assert not memory.plan_memory("auto", "auto", MPS, bf16_sizes, facts=small).fits
    # without facts a device other than CUDA is planned too (was: "nothing to offload")
    assert memory.plan_memory("auto", "auto", torch.device("xpu"), bf16_sizes, free_bytes=16 * GIB).mode != "gpu"


# -- Intel XPU, DirectML -----------------------------------------------------------------------

def test_xpu_and_directml_compute_positions_on_the_cpu_and_mps_cuda_do_not():
    assert DeviceFacts.of_kind("xpu").positions_on_cpu and DeviceFacts.of_kind("directml").positions_on_cpu
    assert not DeviceFacts.of_kind("mps").positions_on_cpu and not DeviceFacts.of_kind("cuda").positions_on_cpu


def test_the_host_position_embedding_computes_on_the_cpu_and_returns_to_the_ids_device():
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    inner = FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])
    seen = []
    inner.register_forward_pre_hook(lambda _m, args: seen.append(args[0].device.type))
    wrapped = positions.HostPositionEmbedding(inner)
    ids = positions.grid_ids(3, 5)
    expected = inner(ids)
    got = wrapped(ids)
    assert seen == ["cpu", "cpu"] and all(torch.equal(a, b) for a, b in zip(expected, got))


def test_an_xpu_pipeline_embeds_positions_on_the_host_and_gives_the_same_latents():
    plain = random_pipelines.make_pipeline(torch.float32)
    xpu = USOPipeline(build_random_models("tiny", dtype=torch.float32),
                      EngineOptions(device="cpu", precision="fp32", facts=DeviceFacts.of_kind("xpu", "cpu")))
    assert isinstance(xpu.transformer.pos_embed, positions.HostPositionEmbedding)
    assert torch.equal(random_pipelines.run(plain, steps=2), random_pipelines.run(xpu, steps=2))


def test_directml_without_a_free_figure_plans_and_says_it_cannot_check(bf16_sizes):
    facts = DeviceFacts.of_kind("directml", note="DirectML reports no memory figures (ComfyUI assumes 1 GiB)")
    plan = memory.plan_memory("auto", "auto", facts.torch_device, bf16_sizes, facts=facts)
    assert plan.mode == "gpu" and "cannot check" in plan.reason and not facts.generator


# -- noise ----------------------------------------------------------------------------------------

def test_noise_comes_from_the_cpu_generator_on_every_device():
    cpu = sampler.initial_noise(42, 64, 48, torch.device("cpu"))
    assert torch.equal(cpu, reference_noise(42, 64, 48))
    # The meta device has no generator of its own (like DirectML): the noise is drawn on the CPU.
    meta = sampler.initial_noise(42, 64, 48, torch.device("meta"))
    assert meta.device.type == "meta" and meta.shape == cpu.shape and meta.dtype == torch.bfloat16


# -- ComfyUI-style choices -----------------------------------------------------------------------

def test_forced_unet_dtypes_win_over_the_files_under_auto():
    fp8 = card(unet_dtype=torch.float8_e4m3fn)
    assert memory.resolve_precision("auto", CUDA, BF16_FILES.stored, facts=fp8).fp8_storage
    fp32 = memory.resolve_precision("auto", CUDA, FP8_FILES.stored, facts=card(unet_dtype=torch.float32))
    assert (fp32.compute, fp32.fp8_storage, fp32.text) == (torch.float32, False, torch.float32)
    fp16 = memory.resolve_precision("auto", CUDA, BF16_FILES.stored, facts=card(unet_dtype=torch.float16))
    assert fp16.compute == torch.float16
    # an explicit precision on the node still wins over the flag
    assert memory.resolve_precision("bf16", CUDA, facts=card(unet_dtype=torch.float16)).compute == torch.bfloat16


def test_forced_text_and_vae_dtypes():
    p = memory.resolve_precision("auto", CUDA, BF16_FILES.stored,
                                 facts=card(text_dtype=torch.float16, vae_dtype=torch.bfloat16))
    assert (p.text, p.vae) == (torch.float16, torch.bfloat16)
    assert memory.resolve_precision("auto", CUDA, FileStorage("bf16", "bf16"),
                                    facts=card(text_dtype=torch.float8_e4m3fn)).t5_storage == torch.float8_e4m3fn


@pytest.mark.parametrize("state, mode", [("normal", "gpu"), ("high", "gpu"), ("low", "model_offload"),
                                         ("no", "group_offload")])
def test_vram_states_on_a_48_gb_card(bf16_sizes, state, mode):
    plan = memory.plan_memory("auto", "auto", CUDA, bf16_sizes, facts=card(gib=48, vram_state=state))
    assert plan.mode == mode and plan.fits


def test_reserve_and_pinning_flags(bf16_sizes):
    fp8 = memory_table.model_sizes(FP8_FILES, memory.resolve_precision("auto", CUDA, FP8_FILES.stored, native=True))
    assert memory.plan_memory("auto", "auto", CUDA, fp8, facts=card(gib=24)).mode == "gpu"
    assert memory.plan_memory("auto", "auto", CUDA, fp8, facts=card(gib=24, reserve_bytes=8 * GIB)).mode == \
        "model_offload"
    host = memory.HostMemory(60 * GIB, 64 * GIB)
    pinned = memory.plan_memory("auto", "auto", CUDA, bf16_sizes, host=host, facts=card(gib=16))
    off = memory.plan_memory("auto", "auto", CUDA, bf16_sizes, host=host, facts=card(gib=16, pin_allowed=False))
    capped = memory.plan_memory("auto", "auto", CUDA, bf16_sizes, host=host,
                                facts=card(gib=16, pin_cap_bytes=4 * GIB))
    assert pinned.pinned_bytes > 0 and off.pinned_bytes == 0 and off.pin_budget_bytes == 0
    assert capped.pin_budget_bytes == 4 * GIB


def test_text_encoders_and_the_vae_on_the_host_stay_there():
    facts = DeviceFacts.of_kind("cuda", "meta", text_device="cpu", vae_device="cpu")
    pipe = USOPipeline(build_random_models("tiny", dtype=torch.float32),
                       EngineOptions(device="meta", precision="fp32", memory="gpu", facts=facts))
    assert {p.device.type for p in pipe.t5.parameters()} == {"cpu"}
    assert {p.device.type for p in pipe.vae.parameters()} == {"cpu"}
    assert {p.device.type for p in pipe.transformer.parameters()} == {"meta"}
    with pipe.placement.using(pipe.t5, pipe.clip):
        assert {p.device.type for p in pipe.clip.parameters()} == {"cpu"}


def test_facts_read_at_two_moments_are_equal():
    assert card(gib=24) == DeviceFacts.of_kind("cuda", total_bytes=24 * GIB, free_bytes=GIB, native_bf16=True)


def test_an_amd_pipeline_runs_the_vae_attention_without_sdpa():
    from diffusers.models.attention_processor import AttnProcessor

    amd = USOPipeline(build_random_models("tiny", dtype=torch.float32),
                      EngineOptions(device="cpu", precision="fp32", facts=DeviceFacts.of_kind("rocm", "cpu")))
    assert {type(p) for p in amd.vae.attn_processors.values()} == {AttnProcessor}
    nvidia = USOPipeline(build_random_models("tiny", dtype=torch.float32),
                         EngineOptions(device="cpu", precision="fp32", facts=DeviceFacts.of_kind("cuda", "cpu")))
    assert AttnProcessor not in {type(p) for p in nvidia.vae.attn_processors.values()}


def test_a_subject_sampled_with_a_seed_draws_on_the_cpu():
    from nodes.engine import vae as vae_module

    models = build_random_models("tiny", dtype=torch.float32)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    a = vae_module.encode_latents(models.vae, pixels, sample_seed=5)
    dist = models.vae.encode(pixels).latent_dist
    expected = vae_module.scale(models.vae, dist.sample(generator=torch.Generator("cpu").manual_seed(5)))
    assert torch.equal(a, expected)


def test_bf16_named_or_forced_runs_in_bf16_where_comfyui_would_not_choose_it():
    cpu = DeviceFacts.of_kind("cpu", native_bf16=False)   # ComfyUI's should_use_bf16 on the CPU
    assert memory.resolve_precision("bf16", torch.device("cpu"), facts=cpu).compute == torch.bfloat16
    forced = DeviceFacts.of_kind("cpu", native_bf16=False, unet_dtype=torch.bfloat16)
    assert memory.resolve_precision("auto", torch.device("cpu"), facts=forced).compute == torch.bfloat16
    old_mac = DeviceFacts.of_kind("mps", native_bf16=False, unet_dtype=torch.bfloat16)
    assert memory.resolve_precision("auto", MPS, facts=old_mac).compute == torch.float16
