"""Random-weight USO model sets in the real architecture, for benchmarks and install smoke tests.

No file and no hub is needed: modules are built from configs, weights drawn at a sane scale, and
word-level tokenizers built in memory. Images made with them are noise by design.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .architecture import official
from .lora import LoraPart
from .model_set import LoadedModels
from .projector import StyleProjector

# Each size keeps head size 128 and RoPE axes (16, 56, 56) except "tiny", which is the test size.
SIZES = {
    "tiny": {"flux": dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
                          joint_attention_dim=48, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
             "t5": dict(d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
             "clip": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
             "siglip": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=27, num_attention_heads=2,
                            image_size=56, patch_size=14),
             "vae": dict(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4),
             "style_tokens": 8, "lora_rank": 4},
    "medium": {"flux": dict(num_layers=4, num_single_layers=8, attention_head_dim=128, num_attention_heads=6,
                            joint_attention_dim=1024, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)),
               "t5": dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=4, num_heads=16),
               "clip": dict(),
               "siglip": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=27, num_attention_heads=6),
               "vae": dict(block_out_channels=[32, 64, 128, 128], layers_per_block=1, norm_num_groups=32),
               "style_tokens": 64, "lora_rank": 32},
    "full": {"flux": {}, "t5": {}, "clip": {}, "siglip": {}, "vae": {}, "style_tokens": 64, "lora_rank": 128},
}

_WORDS = ("a the of and in on with photo portrait painting style woman man cat dog red blue green "
          "hat sky forest city night light dark watercolor oil sketch anime cinematic detailed").split()


def _init_(module: nn.Module, generator: torch.Generator) -> None:
    """Weights ~ N(0, 1/fan_in) so activations stay O(1) through deep stacks; norms at 1."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
            elif "norm" in name and name.endswith(("weight", "scale")):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def _word_tokenizer(kind: str, vocab_size: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "t5":
        specials = ["<pad>", "</s>", "<unk>"]
    else:
        specials = ["<|startoftext|>", "<|endoftext|>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(_WORDS))}
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                       unk_token="<unk>", model_max_length=512)
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>", model_max_length=77)


def drop_post_layernorm(siglip: nn.Module) -> None:
    getattr(siglip, "vision_model", siglip).post_layernorm = nn.Identity()


def architectures(size: str = "tiny") -> dict:
    """The USO models of `size` (one of SIZES) as factories building each in the real architecture
    (call them under `torch.device("meta")` for shapes without memory), with their configs."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, SiglipVisionConfig, SiglipVisionModel, T5Config, \
        T5EncoderModel

    spec = SIZES[size]
    flux_cfg = {**official("flux1-dev-transformer"), **spec["flux"]}
    flux_cfg["axes_dims_rope"] = tuple(flux_cfg["axes_dims_rope"])
    t5_cfg = {**official("t5-v1_1-xxl-encoder"), **spec["t5"]}
    clip_cfg = {**official("clip-l-text"), **spec["clip"]}
    clip_cfg["pooled_projection_dim"] = None
    siglip_cfg = {**official("siglip-so400m-patch14-384-vision"), **spec["siglip"]}
    vae_cfg = {**official("flux-vae"), **spec["vae"]}
    for cfg in (t5_cfg, clip_cfg, siglip_cfg):
        cfg.pop("model_type", None)
    clip_cfg.pop("pooled_projection_dim")
    # Word-level tokenizers: ids 0..2 are the special tokens.
    clip_cfg.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    hidden = flux_cfg["num_attention_heads"] * flux_cfg["attention_head_dim"]
    grid = (siglip_cfg["image_size"] // siglip_cfg["patch_size"]) ** 2

    return {"transformer": lambda: FluxTransformer2DModel(**flux_cfg),
            # USO reads the second-to-last layer: the last one and the head are not loaded (nor
            # the post-layernorm: `drop_post_layernorm`).
            "siglip": lambda: SiglipVisionModel(SiglipVisionConfig(
                **{**siglip_cfg, "num_hidden_layers": siglip_cfg["num_hidden_layers"] - 1, "vision_use_head": False})),
            "projector": lambda: StyleProjector(grid, spec["style_tokens"], siglip_cfg["hidden_size"], hidden),
            "t5": lambda: T5EncoderModel(T5Config(**t5_cfg)),
            "clip": lambda: CLIPTextModel(CLIPTextConfig(**clip_cfg)),
            "vae": lambda: AutoencoderKL(**vae_cfg),
            "configs": {"flux": flux_cfg, "t5": t5_cfg, "clip": clip_cfg, "siglip": siglip_cfg}}


def build_random_models(size: str = "tiny", dtype: torch.dtype = torch.float32, device="cpu",
                        seed: int = 0) -> LoadedModels:
    """A complete LoadedModels with random weights; `size` is one of SIZES."""
    spec = SIZES[size]
    gen = torch.Generator().manual_seed(seed)
    make = architectures(size)
    cfgs = make["configs"]

    def build(factory, build_dtype=torch.float32):
        # Cast on the meta device, then allocate: memory is taken once, in the target dtype (a
        # full-size set built in fp32 and cast afterwards needs ~70 GB of RAM for ~24 GB of bf16).
        # Each weight is still drawn in fp32 and rounded on copy, so the values do not depend on
        # how the set was built.
        with torch.device("meta"):
            module = factory().to(build_dtype)
        module = module.to_empty(device="cpu")
        _init_(module, gen)
        for name, buf in module.named_buffers():
            if name.endswith("position_ids"):
                buf.copy_(torch.arange(buf.shape[-1]).expand(buf.shape))
        return module.to(device=device).eval().requires_grad_(False)

    transformer = build(make["transformer"], dtype)
    siglip = build(make["siglip"])
    drop_post_layernorm(siglip)
    projector = build(make["projector"], dtype)
    text_dtype = torch.float32 if dtype == torch.float16 else dtype
    t5 = build(make["t5"], text_dtype)
    clip = build(make["clip"], text_dtype)
    vae = build(make["vae"])
    return LoadedModels(
        transformer=transformer, transformer_config=cfgs["flux"], vae=vae, t5=t5, clip=clip,
        t5_tokenizer=_word_tokenizer("t5", cfgs["t5"]["vocab_size"]),
        clip_tokenizer=_word_tokenizer("clip_l", cfgs["clip"]["vocab_size"]),
        siglip=siglip, siglip_layers=cfgs["siglip"]["num_hidden_layers"], projector=projector,
        lora_parts=_random_lora(transformer, spec["lora_rank"], gen, dtype),
        lora_rank=spec["lora_rank"], lora_name=f"random-{size}",
        style_owner=f"random-{size}-{seed}", subject_owner=f"random-{size}-{seed}")


def _random_lora(transformer: nn.Module, rank: int, gen: torch.Generator, dtype: torch.dtype) -> list[LoraPart]:
    """A LoRA on exactly the modules the USO LoRA touches (see lora._targets)."""
    parts = []
    for name, module in transformer.named_modules():
        last = name.rsplit(".", 1)[-1]
        touched = (name.startswith("transformer_blocks.") and last in (
            "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")) or \
            name.endswith("attn.to_out.0") or \
            (name.startswith("single_transformer_blocks.") and (last in ("to_q", "to_k", "to_v") or
                                                                name.endswith(".proj_out")))
        if touched and isinstance(module, nn.Linear):
            down = torch.randn(rank, module.in_features, generator=gen) / math.sqrt(module.in_features)
            up = torch.randn(module.out_features, rank, generator=gen) * (0.1 / math.sqrt(rank))
            parts.append(LoraPart(name, down.to(dtype), up.to(dtype)))
    return parts
