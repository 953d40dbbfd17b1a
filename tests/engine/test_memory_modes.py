"""Precision and placement modes (nodes/engine/memory/) on tiny random-weight models.

Tolerances (stated here, checked below):
- Placement modes (gpu, model_offload, group_offload; encoders resident or streamed) only decide
  where weights live, never the arithmetic: the latents must be *identical* to the plain bf16 run.
  On this CPU-only machine the offload modes install the same diffusers hooks with the CPU as
  both places, so the hooks are in the path; the CUDA-stream part is not (no GPU here).
- fp8 storage rounds each stored weight to e4m3 (3 mantissa bits, relative error <= 2^-4): the
  latents after 3 steps must stay within 5% (mean |diff| / std of the bf16 latents) of the bf16
  run -- measured 2.0% on this model -- and fp8 + an offload mode must equal fp8 exactly.
- What needs a GPU (free-VRAM numbers, CUDA streams, moving between devices) is tested as decision
  logic with stated free-memory numbers, never as a faked GPU result.
"""
from __future__ import annotations

import pytest
import random_pipelines
import torch

from nodes.engine import USOPipeline, fp8, memory
from nodes.engine.errors import InputError
from nodes.engine.lora import LoraLinear
from nodes.engine.random_models import build_random_models

W, H, STEPS, SEEDS = 64, 48, 3, [3]
GIB = 1024 ** 3
FP8_REL_TOL = 0.05


def make_pipeline(**options) -> USOPipeline:
    return random_pipelines.make_pipeline(torch.bfloat16, **options)


def run(pipe: USOPipeline, seeds=SEEDS) -> torch.Tensor:
    return random_pipelines.run(pipe, seeds, STEPS)


@pytest.fixture(scope="module")
def bf16_latents():
    return run(make_pipeline())


@pytest.fixture(scope="module")
def fp8_latents():
    return run(make_pipeline(precision="fp8_e4m3fn"))


@pytest.mark.parametrize("mode,encoders", [("gpu", "offload"), ("model_offload", "auto"),
                                           ("group_offload", "auto"), ("auto", "offload")])
def test_placement_modes_leave_the_latents_identical(bf16_latents, mode, encoders):
    pipe = make_pipeline(memory=mode, encoders=encoders)
    if mode == "group_offload":
        assert memory.has_group_offload(pipe.transformer)
    if encoders == "offload" or mode in ("model_offload", "group_offload"):
        assert pipe.placement.is_streamed(pipe.t5) and memory.has_group_offload(pipe.t5)
        assert pipe.placement.is_streamed(pipe.siglip)
    assert torch.equal(run(pipe), bf16_latents)


def test_fp8_storage_stores_modulation_in_fp8_keeps_the_skip_list_and_the_lora(bf16_latents, fp8_latents):
    pipe = make_pipeline(precision="fp8_e4m3fn")
    assert pipe.lora_mode == "unfused"
    names = fp8.fp8_layers(pipe.transformer)
    # AdaLN modulation Linears are stored in fp8 too (diffusers' default would keep them in bf16).
    assert "transformer_blocks.0.norm1.linear" in names
    assert "transformer_blocks.0.norm1_context.linear" in names
    assert "single_transformer_blocks.0.norm.linear" in names
    assert "norm_out.linear" in names
    assert "single_transformer_blocks.0.proj_out.base" in names  # under the unfused LoRA
    for kept in ("x_embedder", "context_embedder", "proj_out", "time_text_embed.timestep_embedder.linear_1"):
        assert kept not in names and not fp8.fp8_storable(kept)
    lora_layers = [m for m in pipe.transformer.modules() if isinstance(m, LoraLinear)]
    assert lora_layers and all(m.lora_down.dtype == torch.bfloat16 for m in lora_layers)
    bf16_pipe = make_pipeline()
    assert memory.module_bytes(pipe.transformer) < 0.75 * memory.module_bytes(bf16_pipe.transformer)
    rel = ((fp8_latents - bf16_latents).abs().mean() / bf16_latents.std()).item()
    assert 0 < rel < FP8_REL_TOL


@pytest.mark.parametrize("mode", ["group_offload", "model_offload"])
def test_fp8_with_offload_equals_fp8(fp8_latents, mode):
    assert torch.equal(run(make_pipeline(precision="fp8_e4m3fn", memory=mode)), fp8_latents)


def test_enable_fp8_storage_is_idempotent():
    models = build_random_models("tiny", dtype=torch.bfloat16)
    first = fp8.enable_fp8_storage(models.transformer, torch.bfloat16)
    assert first > 0
    assert fp8.enable_fp8_storage(models.transformer, torch.bfloat16) == 0


# -- choosing a mode (free memory given, as on a GPU) -----------------------------------------

CUDA = torch.device("cuda")  # only a name here: plan_memory never touches the device when free_bytes is given


def sizes(transformer=22.0, encoders=11.0, vae=0.3, quantized=False):
    """Model sizes in GiB; a streamed transformer needs 1/20 of it on the device, an encoder 1/50."""
    t, e, v = int(transformer * GIB), int(encoders * GIB), int(vae * GIB)
    return memory.ModelSizes(memory.ModuleSize(t, t, t // 20), memory.ModuleSize(v, v, v),
                             (memory.ModuleSize(e, e, e // 50),), quantized)


def plan(free_gib, transformer=22.0, encoders=11.0, vae=0.3, mode="auto", enc="auto"):
    return memory.plan_memory(mode, enc, CUDA, sizes(transformer, encoders, vae), free_bytes=int(free_gib * GIB))


@pytest.mark.parametrize("free,expected", [
    (80, ("gpu", "resident")),          # H100: everything resident (22 + 11 + 0.3 + 3 decode + 2 slack)
    (35, ("gpu", "offload")),           # transformer + VAE + decode + slack fit (27.3), T5 & co. streamed
    (26, ("model_offload", "offload")),  # the transformer + a step + slack (25); the decode comes after
    (20, ("group_offload", "offload")),
])
def test_auto_picks_the_fastest_mode_that_fits(free, expected):
    p = plan(free)
    assert (p.mode, p.encoders) == expected and p.reason


def test_auto_with_fp8_weights_on_a_24_gb_card_keeps_the_transformer_resident():
    p = plan(22.5, transformer=11.1)
    assert (p.mode, p.encoders) == ("gpu", "offload")


def test_encoder_choice_in_auto_and_explicit_modes():
    assert (plan(80, enc="offload").mode, plan(80, enc="offload").encoders) == ("gpu", "offload")
    # Resident encoders asked for but not fitting: the next mode down, not a crash.
    assert plan(35, enc="resident").mode == "model_offload"
    assert plan(20, mode="gpu").encoders == "offload"        # gpu chosen, encoders cannot stay
    assert plan(80, mode="gpu").encoders == "resident"
    assert plan(80, mode="gpu", enc="offload").encoders == "offload"
    for mode in ("model_offload", "group_offload"):
        assert plan(80, mode=mode, enc="resident").encoders == "offload"
        assert plan(1, mode=mode).mode == mode


def test_cpu_has_nothing_to_offload():
    p = memory.plan_memory("auto", "auto", torch.device("cpu"), sizes(1000, 1000, 1))
    assert (p.mode, p.encoders) == ("gpu", "resident")
    assert memory.plan_memory("auto", "auto", CUDA, sizes(30, 5, 0), free_bytes=37 * GIB).mode == "gpu"
    assert memory.plan_memory("auto", "auto", CUDA, sizes(30, 5, 0), free_bytes=20 * GIB).mode == "group_offload"


def test_model_offload_keeps_no_decode_margin_beside_the_transformer():
    # The transformer and the VAE decode take turns in model offload: a 16 GiB card (15.5 free)
    # with an fp8 transformer (11.1 GiB) samples with it resident, once per image, instead of
    # streaming it every step (which a 6 GiB margin for both jobs at once forced).
    p = memory.plan_memory("auto", "auto", CUDA, sizes(11.1, 4.9, 0.3, True), free_bytes=int(15.5 * GIB))
    assert p.mode == "model_offload" and p.fits
    assert p.device_peak_bytes == int(11.1 * GIB) + memory.plan.SAMPLING_WORK_BYTES + memory.plan.ALLOCATOR_SLACK_BYTES


@pytest.mark.parametrize("bad", [dict(mode="fast"), dict(enc="cpu")])
def test_unknown_names_are_refused(bad):
    with pytest.raises(InputError):
        plan(80, **bad)
    with pytest.raises(InputError):
        make_pipeline(**({"memory": bad["mode"]} if "mode" in bad else {"encoders": bad["enc"]}))


# -- model offload: models take turns on the device ------------------------------------------

class RecordingPlacement(memory.Placement):
    """The real bookkeeping; the tensor moves are recorded instead of done (no GPU here)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log, self.where = [], {}

    def _keep_host_copy(self, module):
        self._host[id(module)] = []

    def _onload_tensors(self, module):
        self.log.append(("on", module.name))
        self.where[module.name] = "gpu"

    def _offload_tensors(self, module):
        self.log.append(("off", module.name))
        self.where[module.name] = "cpu"

    def on_device(self, module):
        return self.where.get(module.name) == "gpu"

    def _empty_cache(self):
        pass


def _named(name):
    m = torch.nn.Linear(2, 2)
    m.name = name
    return m


def test_model_offload_takes_turns_and_keeps_the_last_model_until_another_needs_room():
    transformer, vae = _named("transformer"), _named("vae")
    p = RecordingPlacement("model_offload", CUDA)
    p.setup(transformer, [vae])
    with p.use(vae, keep=True):
        pass
    with p.use(transformer, keep=True):
        assert p.where == {"vae": "cpu", "transformer": "gpu"}
    with p.use(transformer, keep=True):        # already there: no transfer
        pass
    with p.use(vae):                             # keep=False: leaves right after
        assert p.where == {"vae": "gpu", "transformer": "cpu"}
    assert p.where["vae"] == "cpu"
    assert p.log == [("on", "vae"), ("off", "vae"), ("on", "transformer"), ("off", "transformer"),
                     ("on", "vae"), ("off", "vae")]
    with p.use(transformer, keep=True):
        pass
    p.release([transformer, vae])
    assert p.where["transformer"] == "cpu" and p._onloaded is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the transfers need a GPU (a CPU run moves nothing)")
@pytest.mark.parametrize("mode", ["model_offload", "group_offload"])
def test_offload_modes_on_a_gpu_move_the_weights_and_leave_the_latents_identical(mode):
    from nodes.engine import EngineOptions

    def on_gpu(memory_mode):
        models = build_random_models("tiny", dtype=torch.bfloat16)
        return USOPipeline(models, EngineOptions(device="cuda", precision="bf16", memory=memory_mode))

    resident = on_gpu("gpu")
    offloaded = on_gpu(mode)
    assert offloaded.placement.moves and all(p.device.type == "cpu" for p in offloaded.transformer.parameters())
    assert torch.equal(run(offloaded), run(resident))


def test_placement_refuses_an_unresolved_mode():
    with pytest.raises(InputError):
        memory.Placement("auto", torch.device("cpu"))


# -- VAE tiling -----------------------------------------------------------------------------

@pytest.mark.parametrize("height_px,tiled", [(1536, False), (1552, True)])
def test_vae_decodes_in_tiles_above_1536_px(monkeypatch, height_px, tiled):
    pipe = make_pipeline()
    calls = []
    original = pipe.vae.tiled_decode
    monkeypatch.setattr(pipe.vae, "tiled_decode", lambda *a, **k: calls.append(1) or original(*a, **k))
    images = pipe.decode(torch.zeros(1, 16, height_px // 8, 2))
    assert images.shape == (1, height_px, 16, 3)
    assert bool(calls) == tiled


def test_a_module_split_across_devices_does_not_count_as_placed():
    # An out-of-memory error in the middle of a move leaves a module split across devices; the
    # next use must move it again. "meta" stands in for the GPU (any non-CPU device moves).
    from torch import nn

    from nodes.engine.memory import Placement

    module = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    placement = Placement("gpu", torch.device("meta"))
    assert not placement.on_device(module)
    module[0].weight = nn.Parameter(torch.empty(4, 4, device="meta"))  # moved before the failure
    assert not placement.on_device(module)
    module.to("meta")
    assert placement.on_device(module)


# -- precision "auto" on GPUs without native bf16 ----------------------------------------------

@pytest.fixture
def fake_cuda(monkeypatch):
    """Two cards: cuda:0 an Ampere (8.6), cuda:1 a Turing T4 (7.5) whose bf16 is only emulated
    (`torch.cuda.is_bf16_supported()` says True for it, as it does on a real T4)."""
    capabilities = {0: (8, 6), 1: (7, 5)}
    current = {"index": 1}

    def capability(device=None):
        index = torch.device(device).index if device is not None else None
        return capabilities[current["index"] if index is None else index]

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    return current


def test_auto_precision_uses_fp16_where_bf16_is_only_emulated(fake_cuda):
    t4 = memory.resolve_precision("auto", torch.device("cuda:1"))
    assert t4.compute == torch.float16 and t4.text == torch.float32 and not t4.fp8_storage
    # The chosen device is asked, not the current one: cuda:0 is Ampere while cuda:1 is current.
    assert memory.resolve_precision("auto", torch.device("cuda:0")).compute == torch.bfloat16
    fake_cuda["index"] = 0
    assert memory.resolve_precision("auto", torch.device("cuda:1")).compute == torch.float16
    assert memory.resolve_precision("auto", torch.device("cuda")).compute == torch.bfloat16
    # bf16 named explicitly on the T4 runs emulated bf16, as asked.
    assert memory.resolve_precision("bf16", torch.device("cuda:1")).compute == torch.bfloat16


# -- host RAM: what the offload modes page-lock -----------------------------------------------

def test_host_memory_is_read_from_the_system():
    host = memory.host_memory()
    assert host is not None and 0 < host.available <= host.total


@pytest.mark.parametrize("available,total,budget", [
    (28, 64, 24),     # 64 GiB machine with the models loaded: available minus the 4 GiB reserve
    (120, 128, 64),   # plenty available: never more than half the RAM
    (3, 32, 0),       # nothing to spare: nothing pinned
])
def test_pin_budget_keeps_a_reserve_and_at_most_half_the_ram(available, total, budget):
    assert memory.pin_budget(memory.HostMemory(available * GIB, total * GIB)) == budget * GIB


def test_24_gib_card_bf16_plan_bounds_pinning_and_names_fp8_and_gguf():
    # The case of the issue: 24 GiB free, bf16 FLUX (22.2 GiB) + 11 GiB of encoders, 64 GiB host.
    p = memory.plan_memory("auto", "auto", CUDA, sizes(22.2, 11, 0.3), free_bytes=24 * GIB,
                           host=memory.HostMemory(28 * GIB, 64 * GIB))
    assert p.mode == "group_offload"
    assert p.pin_budget_bytes == 24 * GIB          # not the 33 GiB of every streamed weight
    assert "fp8_e4m3fn" in p.reason and "GGUF" in p.reason and "would stay on the GPU" in p.reason
    # Already fp8: no hint to use fp8.
    fp8_plan = memory.plan_memory("auto", "auto", CUDA, sizes(11.6, 11, 0.3, quantized=True), free_bytes=12 * GIB,
                                  host=memory.HostMemory(28 * GIB, 64 * GIB))
    assert fp8_plan.mode == "group_offload" and "fp8_e4m3fn" not in fp8_plan.reason
    # Everything fits: nothing to suggest, nothing pinned by the plan.
    assert "GGUF" not in plan(80).reason


def _module(megabytes):
    return torch.nn.Linear(megabytes * 1024, 256, bias=False)  # 1 MiB per 1024 inputs in fp32


def test_group_offload_pins_host_copies_only_within_the_budget(monkeypatch):
    from diffusers.hooks import group_offloading

    calls = {}
    monkeypatch.setattr(group_offloading, "apply_group_offloading",
                        lambda module, **kw: calls.__setitem__(module.name, kw["low_cpu_mem_usage"]))
    monkeypatch.setattr(memory.Placement, "use_stream", property(lambda self: True))
    transformer, t5, clip, vae = _module(6), _module(3), _module(1), _module(1)
    for name, m in (("transformer", transformer), ("t5", t5), ("clip", clip)):
        m.name = name
    moved = []
    monkeypatch.setattr(vae, "to", lambda device: moved.append(device))
    p = memory.Placement("group_offload", CUDA, "offload", pin_budget_bytes=9 * 1024 ** 2)
    p.setup(transformer, [vae, t5, clip], encoders=[t5, clip])
    # The transformer (6 MiB, pinned as 8: the allocator rounds each block up to a power of two)
    # is pinned; T5 (3 MiB, pinned as 4) would pass the 9 MiB budget: pinned per transfer instead
    # (low_cpu_mem_usage); CLIP (1 MiB) still fits.
    assert calls == {"transformer": False, "t5": True, "clip": False}
    assert p.pinned_bytes == 9 * 1024 ** 2 and moved == [CUDA]


def test_model_offload_pins_host_copies_only_within_the_budget(monkeypatch):
    pinned = []

    def fake_pin(tensor):
        pinned.append(tensor.numel())
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    transformer, vae = _module(6), _module(1)
    p = memory.Placement("model_offload", CUDA, pin_budget_bytes=4 * 1024 ** 2)
    p.setup(transformer, [vae])
    assert pinned == [vae.weight.numel()]          # the 6 MiB transformer stays pageable
    unbounded = memory.Placement("model_offload", CUDA)
    pinned.clear()
    unbounded.setup(transformer, [vae])
    assert sorted(pinned) == sorted([vae.weight.numel(), transformer.weight.numel()])


# -- sharing the device with a host (ComfyUI) ------------------------------------------------------

def test_device_hooks_hear_each_step_before_it_runs_and_leave_the_latents_identical(bf16_latents):
    from nodes.engine import EngineOptions

    heard, asked = [], []
    hooks = memory.DeviceHooks(before_use=lambda placement, modules: heard.append(list(modules)),
                               available_bytes=lambda device: asked.append(device) or 0)
    pipe = USOPipeline(build_random_models("tiny", dtype=torch.bfloat16),
                       EngineOptions(device="cpu", precision="bf16"), hooks)
    assert torch.equal(run(pipe), bf16_latents)
    assert asked == []  # on the CPU the plan asks the host nothing (nothing moves)
    names = {id(m): n for n, m in [("transformer", pipe.transformer), ("vae", pipe.vae), ("t5", pipe.t5),
                                   ("clip", pipe.clip), ("siglip", pipe.siglip), ("projector", pipe.projector)]}
    assert [[names[id(m)] for m in modules] for modules in heard] == [
        ["transformer", "vae", "t5", "clip", "siglip", "projector"],   # "gpu" mode places all at load
        ["siglip", "projector"], ["vae"], ["t5", "clip"], ["transformer"], ["vae"]]  # style, subject, prompt,
    # sampling, decoding: each step announced once, with everything it runs, before it runs


def test_a_host_releasing_one_model_leaves_the_other_where_it_is():
    transformer, vae = _named("transformer"), _named("vae")
    released = []
    p = RecordingPlacement("model_offload", CUDA)
    p.on_release = lambda modules: released.append([m.name for m in modules])
    p.setup(transformer, [vae])
    with p.using(transformer, keep=True):
        pass
    p.release([vae])                       # the host takes back the VAE's room, not the transformer's
    assert p._onloaded is transformer and p.where["transformer"] == "gpu"
    with p.using(transformer, keep=True):  # still there: no transfer
        pass
    assert p.log == [("on", "transformer"), ("off", "vae")] and released == [["vae"]]


def test_streamed_modules_need_their_two_largest_groups_on_the_device():
    pipe = make_pipeline(memory="group_offload")
    groups: dict[str, int] = {}
    for name, t in [*pipe.transformer.named_parameters(), *pipe.transformer.named_buffers()]:
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] in ("transformer_blocks", "single_transformer_blocks") else "rest"
        groups[key] = groups.get(key, 0) + t.numel() * t.element_size()
    assert pipe.placement.device_bytes(pipe.transformer) == sum(sorted(groups.values())[-2:])
    assert pipe.placement.device_bytes(pipe.vae) == memory.module_bytes(pipe.vae)  # placed whole
    assert pipe.placement.bytes_on_device(pipe.vae) == memory.module_bytes(pipe.vae)  # CPU: all of it
