"""One image on several devices: diffusers' context parallelism (Ulysses / ring attention) over
the sequence of our transformer call.

USO's sequence is [style tokens, T5 tokens] on the text side and [noise tokens, subject tokens]
on the image side. The style tokens are prepended to the *output* of the text projection
(`sampler.style_injection`), so diffusers' own FLUX plan, which splits `encoder_hidden_states`
at the model's input, would hand every rank the whole style next to half the text (and text ids
of another length). `USO_PLAN` splits the text side where it is complete, at the first block's
input, and everything else as diffusers does: image tokens and both id lists at the model's
input, the output gathered after `proj_out`. Every token still attends to every other one (the
attention gathers the sequence), so the latents equal one process's up to float rounding.

Needs: torch.distributed initialised (torchrun), the same weights on every rank, the image-side
token count (noise + subject) and the text-side count (style + 512) divisible by the degree, and
the attention heads divisible by the Ulysses degree. Ring attention also needs an attention
backend that returns the log-sum-exp (flash, _native_flash, _native_cudnn, sage: CUDA only);
diffusers' "native" backend refuses it.
"""
from __future__ import annotations

import types

import torch


def uso_plan() -> dict:
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    return {
        "": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
             "img_ids": ContextParallelInput(split_dim=0, expected_dims=2),
             "txt_ids": ContextParallelInput(split_dim=0, expected_dims=2)},
        # style + text tokens, after the style tokens were prepended to the text projection
        "transformer_blocks.0": {"encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def enable(transformer, *, ulysses: int = 1, ring: int = 1) -> None:
    """Split every call of `transformer` over the ranks of the initialised process group."""
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring)
    device = next(transformer.parameters()).device
    if device.type == "cpu":
        # diffusers 0.42's ModelMixin._resolve_parallel_config picks the rank's device as
        # `rank % torch.accelerator.device_count()`, a division by zero without an accelerator.
        # Same steps with the CPU as the device (a gloo process group).
        transformer._resolve_parallel_config = types.MethodType(_resolve_on_cpu, transformer)
    transformer.enable_parallelism(config=config, cp_plan=uso_plan())
    share_step_cache_decision(transformer)


def share_step_cache_decision(transformer) -> bool:
    """The step cache (First Block Cache) decides in every call whether to skip the remaining
    blocks, from how much the first block's residual changed. Split over ranks, each rank sees
    only its shard of the sequence: the ranks could decide differently, and the rank that computes
    then waits forever in the next attention's collective for the one that skipped. Here every
    rank decides from the whole sequence instead: sum|r - r_prev| / sum|r_prev| over all shards
    (one all-reduce of two numbers per step), the ratio one process computes. Returns whether a
    step cache was found (nothing to share otherwise)."""
    config = getattr(transformer, "_parallel_config", None)
    if config is None or config.context_parallel_config is None:
        return False
    group = config.context_parallel_config._flattened_mesh.get_group()
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        head = registry.get_hook("fbc_leader_block_hook") if registry is not None else None
        if head is not None:
            head._should_compute_remaining_blocks = types.MethodType(_decided_across(group), head)
            return True
    return False


def _decided_across(group):
    @torch.compiler.disable
    def should_compute(hook, residual: torch.Tensor) -> bool:
        previous = hook.state_manager.get_state().head_block_residual
        if previous is None:  # the first step of an image, on every rank
            return True
        sums = torch.stack([(residual - previous).abs().sum(), previous.abs().sum()]).float()
        torch.distributed.all_reduce(sums, group=group)
        return (sums[0] / sums[1]).item() > hook.threshold
    return should_compute


def _resolve_on_cpu(self, config):
    from diffusers.models._modeling_parallel import ParallelConfig

    config = ParallelConfig(context_parallel_config=config)
    cp = config.context_parallel_config
    mesh = cp.mesh or torch.distributed.device_mesh.init_device_mesh(
        "cpu", mesh_shape=cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    config.setup(torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.device("cpu"), mesh=mesh)
    self._parallel_config = config
    return config
