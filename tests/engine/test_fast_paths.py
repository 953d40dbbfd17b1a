"""Fast paths that must not fight each other, and per-step waste, on tiny random-weight models (CPU):

- fp8 storage (plain and scaled) + regional compile: no graph break, as many graphs as without
  fp8 (checked with torch.compile's "eager" backend: the same graph capture and guards, no C++);
- unfused user LoRAs under compile: a new strength, or another LoRA of the same shapes, does not
  recompile (the scale is a tensor, not a guarded Python float), and the compiled result follows it;
- fp8 storage keeps every bias (the AdaLN modulation's included) in the compute dtype;
- the scaled-fp8 upcast moves 7 bytes per parameter (a cast to bf16, then the multiply by the
  fp32 scale) instead of 19 (through two fp32 temporaries), with the same bits;
- the style tokens are converted / moved once per image, not in every step.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from nodes.engine import fp8, lora, sampler, speed
from nodes.engine.lora import LoraPart
from nodes.engine.random_models import build_random_models

BF16 = torch.bfloat16
CPU = torch.device("cpu")


def _transformer() -> nn.Module:
    return build_random_models("tiny", dtype=BF16).transformer


def _inputs(transformer, seed=0) -> dict:
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    return dict(hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g).to(BF16),
                encoder_hidden_states=torch.randn(1, 5, cfg.joint_attention_dim, generator=g).to(BF16),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(BF16),
                timestep=torch.tensor([0.5], dtype=BF16), guidance=torch.tensor([4.0], dtype=BF16),
                img_ids=ids, txt_ids=torch.zeros(5, 3), return_dict=False)


def _forward(transformer) -> torch.Tensor:
    with torch.inference_mode():
        return transformer(**_inputs(transformer))[0]


def _store_scaled(transformer) -> int:
    """Every fp8-storable Linear as a ComfyUI scaled-fp8 file stores it: weight / scale in fp8 and
    the per-tensor scale."""
    count = 0
    for name, m in transformer.named_modules():
        if type(m) is nn.Linear and fp8.fp8_storable(name):
            scale = m.weight.float().abs().max() / 448
            m.weight.data = (m.weight.float() / scale).to(torch.float8_e4m3fn)
            fp8.keep_scaled_fp8(m, scale, BF16)
            count += 1
    return count


def _compiled_counts(transformer) -> tuple[int, int]:
    """(graph breaks, graphs) of two compiled forwards."""
    torch._dynamo.reset()
    counters.clear()
    speed.enable_regional_compile(transformer, CPU, backend="eager")
    _forward(transformer)
    _forward(transformer)
    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def graphs_without_fp8():
    breaks, graphs = _compiled_counts(_transformer())
    assert breaks == 0
    return graphs


@pytest.mark.parametrize("storage", ["fp8", "scaled_fp8"])
def test_fp8_storage_compiles_without_graph_breaks(storage, graphs_without_fp8):
    transformer = _transformer()
    if storage == "scaled_fp8":
        assert _store_scaled(transformer) > 0
    assert fp8.enable_fp8_storage(transformer, BF16) > 0 or storage == "scaled_fp8"
    assert len(fp8.fp8_layers(transformer)) > 20
    eager = _forward(transformer)
    breaks, graphs = _compiled_counts(transformer)
    # Was 50 breaks and 31 graphs (diffusers' layerwise casting swapped weight.data per call).
    assert (breaks, graphs) == (0, graphs_without_fp8)
    assert torch.equal(_forward(transformer), eager)


def test_fp8_storage_keeps_biases_in_the_compute_dtype():
    transformer = _transformer()
    fp8.enable_fp8_storage(transformer, BF16)
    stored = {n: m for n, m in transformer.named_modules() if isinstance(m, fp8.UpcastLinear)}
    assert "transformer_blocks.0.norm1.linear" in stored  # AdaLN modulation
    for name, m in stored.items():
        assert m.weight.dtype == torch.float8_e4m3fn, name
        assert m.bias is None or m.bias.dtype == BF16, name


class _Traffic(TorchDispatchMode):
    """Bytes read and written, on tensors of `numel` elements, by every operation that writes a new
    tensor (views and metadata checks move nothing), leaving out the matrix product itself: the
    traffic of preparing a weight."""

    MATMUL = {torch.ops.aten.linear.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
              torch.ops.aten.matmul.default, torch.ops.aten.t.default}

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.bytes = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        fresh = isinstance(out, torch.Tensor) and all(
            out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in inputs)
        if fresh and func not in self.MATMUL:
            self.bytes += sum(t.numel() * t.element_size() for t in pytree.tree_leaves((args, kwargs, out))
                              if isinstance(t, torch.Tensor) and t.numel() == self.numel)
        return out


def test_scaled_fp8_upcast_moves_7_bytes_per_parameter_with_the_same_bits():
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(256, 192).to(BF16)
    scale = torch.tensor(0.0123457)
    layer.weight.data = (torch.randn(192, 256, generator=g) * 3).to(torch.float8_e4m3fn)
    fp8.keep_scaled_fp8(layer, scale, BF16)
    x = torch.randn(1, 256, generator=g).to(BF16)
    with torch.inference_mode(), _Traffic(layer.weight.numel()) as traffic:
        out = layer(x)
    # fp8 -> bf16 (1 + 2 bytes) and x scale (2 + 2); was 19: fp8 -> fp32, x scale in fp32, -> bf16.
    assert traffic.bytes / layer.weight.numel() == 7
    dequantized = (layer.weight.float() * scale).to(BF16)   # the file's weight, rounded once
    assert torch.equal(out, nn.functional.linear(x, dequantized, layer.bias))


# -- unfused LoRAs under compile ---------------------------------------------------------------

TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_q",
           "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.attn.to_q"]


def _parts(transformer, seed: int, rank: int = 4) -> list[LoraPart]:
    g = torch.Generator().manual_seed(seed)
    parts = []
    for name in TARGETS:
        m = transformer.get_submodule(name)
        m = m.base if isinstance(m, lora.LoraLinear) else m
        parts.append(LoraPart(name, (torch.randn(rank, m.in_features, generator=g) / 8).to(BF16),
                              (torch.randn(m.out_features, rank, generator=g) / 8).to(BF16)))
    return parts


def test_unfused_lora_strength_and_set_changes_do_not_recompile():
    transformer = _transformer()
    fp8.enable_fp8_storage(transformer, BF16)   # fp8 weights: user LoRAs run unfused
    first, second = _parts(transformer, 1), _parts(transformer, 2)

    def use(name, parts, strength):
        lora.set_user_loras(transformer, (name, strength), [(p, strength) for p in parts], False, CPU, BF16)

    use("first", first, 1.0)
    torch._dynamo.reset()
    speed.enable_regional_compile(transformer, CPU, backend="eager")
    _forward(transformer)
    outputs = []
    counters.clear()
    for name, parts, strength in (("first", first, 0.5), ("first", first, 1.3), ("second", second, 0.8)):
        use(name, parts, strength)
        compiled = _forward(transformer)
        with torch.compiler.set_stance("force_eager"):
            assert torch.equal(compiled, _forward(transformer))   # the new strength is used
        outputs.append(compiled)
    # Was 2 new graphs (one per block kind) at the first new strength.
    assert counters["stats"]["unique_graphs"] == 0 and sum(counters["graph_break"].values()) == 0
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])


# -- style tokens --------------------------------------------------------------------------------

class _Copies(TorchDispatchMode):
    """How often a tensor of `shape` is copied or converted."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    COPIES = {torch.ops.aten.to, torch.ops.aten._to_copy, torch.ops.aten.copy_}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in self.COPIES and tuple(args[0].shape) == self.shape and out is not args[0]:
            self.count += 1
        return out


def test_style_tokens_are_placed_once_per_image_not_every_step():
    models = build_random_models("tiny", dtype=BF16)
    transformer = models.transformer
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    g = torch.Generator().manual_seed(0)
    # As the style cache holds them: elsewhere than the forward needs them (here: another dtype).
    style_tokens = torch.randn(1, 8, hidden, generator=g)
    noise = sampler.initial_noise(3, 64, 48, CPU)
    t5 = torch.randn(1, 512, transformer.config.joint_attention_dim, generator=g)
    pooled = torch.randn(1, transformer.config.pooled_projection_dim, generator=g)
    steps = 4
    with _Copies(style_tokens.shape) as copies:
        sampler.denoise(transformer, noise, t5, pooled, style_tokens, [],
                        [1.0 - i / steps for i in range(steps + 1)], 4.0, BF16)
    assert copies.count == 1   # was one per step
