"""The memory plan of each file set at full size, before anything is loaded: the real
architectures (nodes/engine/configs) built on the meta device in the dtypes `precision=auto`
gives each kind of file, their bytes counted per module, and `memory.plan_memory` run against
simulated cards and hosts. The README's plan table, `--plan` and the tests all come from here.

Assumptions (stated, not measured): a card of N GiB has N - 0.5 GiB free (the CUDA context); a
host of N GiB gives the system 2 GiB and the Python process (torch, CUDA libraries) 2 GiB before
the weights; every model is read into host RAM before placement (safetensors' page cache is not
counted: the kernel reclaims it).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from . import fp8, lora
from .memory.device_facts import DeviceFacts
from .memory.fit import fit_precision, try_precision
from .memory.host import HostMemory
from .memory.plan import _GIB, MemoryPlan, ModelSizes, plan_memory
from .memory.precision import FileStorage, Precision, resolve_precision

CUDA_CONTEXT_BYTES = _GIB // 2
HOST_SYSTEM_BYTES = 2 * _GIB
PROCESS_BYTES = 2 * _GIB
CARDS_GIB = (8, 12, 16, 24, 48, 80)
HOSTS_GIB = (16, 32, 64)
#: GGML's block formats (weights per block, bytes per block), as the gguf package lists them.
GGUF_BLOCKS = {"Q8_0": (32, 34), "Q4_K": (256, 144)}
USO_LORA_RANK = 128


@dataclass(frozen=True)
class FileSet:
    name: str
    files: str                 # what to pick, for the table
    stored: FileStorage
    gguf: str | None = None    # the GGUF quantisation of the transformer


#: The file sets the README names, lightest last.
FILE_SETS = (
    FileSet("fp8 all-in-one", "`flux1-dev-fp8.safetensors`", FileStorage("fp8", "fp8")),
    FileSet("bf16 split", "`flux1-dev.safetensors` + `t5xxl_fp16`", FileStorage("bf16", "fp16")),
    FileSet("scaled fp8", "scaled-fp8 FLUX + `t5xxl_fp8_e4m3fn_scaled`", FileStorage("scaled_fp8", "scaled_fp8")),
    FileSet("GGUF Q8_0", "`flux1-dev-Q8_0.gguf` + `t5xxl_fp8_e4m3fn`", FileStorage("gguf", "fp8"), "Q8_0"),
    FileSet("GGUF Q4_K", "`flux1-dev-Q4_K_S.gguf` + `t5xxl_fp8_e4m3fn`", FileStorage("gguf", "fp8"), "Q4_K"),
)


def _uso_lora_on_meta(transformer: nn.Module, compute: torch.dtype) -> None:
    """The USO LoRA (rank 128) unfused on the transformer, as it runs over fp8 or GGUF weights."""
    modules = dict(transformer.named_modules())
    names = [n for n in modules if (n.startswith("transformer_blocks.") and n.endswith(
        (".attn.to_q", ".attn.to_k", ".attn.to_v", ".attn.add_q_proj", ".attn.add_k_proj", ".attn.add_v_proj",
         ".attn.to_add_out", ".attn.to_out.0"))) or (n.startswith("single_transformer_blocks.") and n.endswith(
             (".attn.to_q", ".attn.to_k", ".attn.to_v", ".proj_out")))]
    parts = [lora.LoraPart(n, torch.empty(USO_LORA_RANK, modules[n].in_features, device="meta"),
                           torch.empty(modules[n].out_features, USO_LORA_RANK, device="meta")) for n in names]
    lora.apply_unfused(transformer, parts, 1.0, compute)


def _quantize_on_meta(transformer: nn.Module, quant: str) -> None:
    """A GGUF transformer's bytes: the Linears fp8 storage would store in 8 bits (not the embedders
    nor the final projection, which GGUF files keep in 16 or 32 bits) packed in `quant` blocks."""
    per_block, block_bytes = GGUF_BLOCKS[quant]
    for name, module in transformer.named_modules():
        if type(module) is nn.Linear and fp8.fp8_storable(name.removesuffix(".base")) \
                and module.in_features % per_block == 0:
            packed = module.weight.numel() // per_block * block_bytes
            module.weight = nn.Parameter(torch.empty(packed, dtype=torch.uint8, device="meta"), requires_grad=False)


def model_sizes(file_set: FileSet, precision: Precision) -> ModelSizes:
    """The model set's bytes when `file_set` is loaded in `precision`, built on the meta device."""
    from .random_models import architectures, drop_post_layernorm

    make = architectures("full")
    with torch.device("meta"):
        transformer = make["transformer"]().to(precision.compute)
        t5 = make["t5"]().to(precision.text)
        clip = make["clip"]().to(precision.text)
        siglip = make["siglip"]().to(precision.vision)
        projector = make["projector"]().to(precision.compute)
        vae = make["vae"]().to(precision.vae)
    drop_post_layernorm(siglip)
    quantized = precision.fp8_storage or file_set.gguf is not None
    if quantized:
        _uso_lora_on_meta(transformer, precision.compute)   # unfused over fp8 or GGUF; fused adds nothing
    if file_set.gguf:
        _quantize_on_meta(transformer, file_set.gguf)
    elif precision.fp8_storage:
        fp8.enable_fp8_storage(transformer, precision.compute)
    if precision.t5_storage is not None:
        for name, module in t5.named_modules():
            if type(module) is nn.Linear and fp8.t5_storable(name):
                module.weight.data = module.weight.data.to(precision.t5_storage)
    return ModelSizes.of(transformer, vae, [t5, clip, siglip, projector], quantized)


def simulated_host(total_gib: int, sizes: ModelSizes | None = None) -> HostMemory:
    """The host before loading (`sizes` None), or after: what is left to allocate once the system,
    the process and every weight have taken theirs (negative: loading does not fit)."""
    total = total_gib * _GIB
    return HostMemory(total - HOST_SYSTEM_BYTES - PROCESS_BYTES - (sizes.total_bytes if sizes else 0), total)


@dataclass(frozen=True)
class PlanRow:
    file_set: str
    card_gib: int
    host_gib: int
    plan: MemoryPlan | None       # None: the weights do not fit the host RAM at all
    host_peak_bytes: int          # the process + the weights + the pinned copies made while placing
    advice: str = ""              # for a row that does not fit: what would
    precision: Precision | None = None  # what `auto` loads the files in (16 bits stored as fp8 to fit)
    fit_note: str = ""            # why `auto` stored 16-bit weights as fp8 (or what would fit)
    stored_fp8: str = ""          # what `auto` stored as fp8 to fit ("transformer", ...)

    @property
    def fits(self) -> bool:
        return self.plan is not None and self.plan.fits


def plan_row(file_set: FileSet, card_gib: int, host_gib: int, sizes_of) -> PlanRow:
    """One row: `precision=auto` on a bf16 card, 16-bit weights stored as fp8 where they would not
    fit otherwise (`memory.fit`); `sizes_of(precision)`: the file set's sizes at a precision."""
    cuda = torch.device("cuda")
    precision = resolve_precision("auto", cuda, file_set.stored, native=True)
    free = card_gib * _GIB - CUDA_CONTEXT_BYTES
    chosen = fit_precision("auto", cuda, precision, sizes_of, free, simulated_host(host_gib),
                           stored_transformer=file_set.stored.transformer)
    if chosen.plan is None and chosen.host_fits:   # nothing to choose: planned as loaded
        chosen = try_precision(chosen.precision, sizes_of(chosen.precision), free, simulated_host(host_gib))
    # Not planned: the weights alone exceed the host RAM.
    host_bytes = chosen.plan.host_bytes if chosen.plan is not None else chosen.host_bytes
    return PlanRow(file_set.name, card_gib, host_gib, chosen.plan, PROCESS_BYTES + host_bytes,
                   precision=chosen.precision, fit_note=chosen.note, stored_fp8=chosen.stored_fp8)


def _advice(lighter: list[str], larger: list[str]) -> str:
    """For a row that does not fit: the first lighter file set and the first larger machine that do."""
    return "fits: " + (", ".join(lighter[:1] + larger[:1]) or "nothing listed here")


def plan_table(cards=CARDS_GIB, hosts=HOSTS_GIB, file_sets=FILE_SETS) -> list[PlanRow]:
    """Every file set x card x host on a bf16-capable card (Ampere or newer), `auto` everywhere;
    a row that does not fit names the first lighter file set, or larger host, that does."""
    cache: dict = {}

    def sizes_for(fs: FileSet):
        def sizes_of(precision: Precision) -> ModelSizes:
            key = (fs.name, precision)
            if key not in cache:
                cache[key] = model_sizes(fs, precision)
            return cache[key]
        return sizes_of

    rows = {(fs.name, c, h): plan_row(fs, c, h, sizes_for(fs)) for fs in file_sets for c in cards for h in hosts}
    out = []
    for (name, card, host), row in rows.items():
        if not row.fits:
            row = replace(row, advice=_advice(
                [fs.name for fs in file_sets if rows[(fs.name, card, host)].fits],
                [f"a {h} GB host" for h in hosts if h > host and rows[(name, card, h)].fits]))
        out.append(row)
    return out


def _gib(n: int) -> str:
    return f"{n / _GIB:.1f}"


_SHORT = {("gpu", "resident"): "gpu+enc", ("gpu", "offload"): "gpu", ("model_offload", "offload"): "model",
          ("group_offload", "offload"): "group"}


def cell(row: PlanRow) -> str:
    """One row as a table cell: the mode, peak VRAM / peak host RAM (pinned) in GiB, and what
    `auto` stored as fp8 to fit."""
    if row.plan is None:
        return f"✗ RAM {_gib(row.host_peak_bytes)}; {row.advice}"
    if not row.plan.fits:
        return f"✗ VRAM {_gib(row.plan.device_peak_bytes)}; {row.advice}"
    fp8 = f"; {row.stored_fp8} as fp8" if row.stored_fp8 else ""
    return (f"{_SHORT[(row.plan.mode, row.plan.encoders)]} {_gib(row.plan.device_peak_bytes)} / "
            f"{_gib(row.host_peak_bytes)} ({_gib(row.plan.pinned_bytes)}){fp8}")


def markdown(rows: list[PlanRow]) -> str:
    """The plan table in Markdown (the README's, and what `--plan` prints): one line per file set
    and host, one column per card."""
    cards = sorted({r.card_gib for r in rows})
    by_key = {(r.file_set, r.host_gib, r.card_gib): r for r in rows}
    lines = ["| files | host | " + " | ".join(f"{c} GB card" for c in cards) + " |",
             "|---|---|" + "---|" * len(cards)]
    for name, host in dict.fromkeys((r.file_set, r.host_gib) for r in rows):
        lines.append(f"| {name} | {host} GB | " + " | ".join(cell(by_key[(name, host, c)]) for c in cards) + " |")
    return "\n".join(lines) + "\n"


#: Apple Silicon Macs by unified RAM (the README's Mac table).
MACS_GIB = (16, 32, 64, 128)


def mac_facts(ram_gib: int) -> DeviceFacts:
    """A Mac with `ram_gib` of unified RAM on macOS 14 or newer (bf16 on MPS)."""
    return DeviceFacts.of_kind("mps", total_bytes=ram_gib * _GIB, native_bf16=True)


def mac_plan_table(macs=MACS_GIB, file_sets=FILE_SETS) -> list[PlanRow]:
    """Every file set on Apple Silicon Macs (macOS 14+), `auto` everywhere: MPS holds no float8, so
    fp8 files are upcast to bf16 as they load (T5 to fp16, on the CPU, as ComfyUI runs it) and a
    GGUF transformer stays packed. Host and device are one pool (`DeviceFacts.plan_free_bytes`):
    a row fits when every weight, the largest job and the allocator's slack fit the RAM the
    system leaves. A row that does not fit names the first file set that does, or a larger Mac."""
    mps = torch.device("mps")
    rows = {}
    for fs in file_sets:
        precision = resolve_precision("auto", mps, fs.stored, facts=mac_facts(macs[0]))
        sizes = model_sizes(fs, precision)
        for ram in macs:
            plan = plan_memory("auto", "auto", mps, sizes, facts=mac_facts(ram))
            rows[(fs.name, ram)] = PlanRow(fs.name, ram, ram, plan, PROCESS_BYTES + plan.host_bytes)
    out = []
    for (name, ram), row in rows.items():
        if not row.fits:
            row = replace(row, advice=_advice(
                [fs.name for fs in file_sets if rows[(fs.name, ram)].fits],
                [f"a {m} GB Mac" for m in macs if m > ram and rows[(name, m)].fits]))
        out.append(row)
    return out


def mac_markdown(rows: list[PlanRow]) -> str:
    """The Mac table in Markdown: one line per file set, one column per Mac; a cell gives the
    unified RAM the run needs at its peak (weights + the largest job + slack), in GiB."""
    macs = sorted({r.card_gib for r in rows})
    by_key = {(r.file_set, r.card_gib): r for r in rows}
    lines = ["| files | " + " | ".join(f"{m} GB Mac" for m in macs) + " |", "|---|" + "---|" * len(macs)]

    def mac_cell(row: PlanRow) -> str:
        peak = _gib(row.plan.device_peak_bytes)
        return f"mps {peak}" if row.fits else f"✗ {peak}; {row.advice}"

    for name in dict.fromkeys(r.file_set for r in rows):
        lines.append(f"| {name} | " + " | ".join(mac_cell(by_key[(name, m)]) for m in macs) + " |")
    return "\n".join(lines) + "\n"
