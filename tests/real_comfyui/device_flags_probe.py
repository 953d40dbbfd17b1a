"""Run inside ComfyUI's own Python with ComfyUI's source on sys.path (not collected by pytest):
ComfyUI's command line is `--cpu` plus the flags in CONFIG; imports ComfyUI's real
comfy.model_management and comfy.cli_args, loads the pack the way ComfyUI does, and prints as one
JSON line what `bridge.device_facts` read and what the engine decided from it.

    python device_flags_probe.py CONFIG.json     CONFIG: {"comfyui", "pack", "work", "flags": [...]}
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys

config = json.load(open(sys.argv[1]))
sys.argv = ["main.py", "--cpu", "--base-directory", os.path.join(config["work"], "base"), *config["flags"]]
sys.path.insert(0, config["comfyui"])
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import utils.extra_config  # noqa: E402,F401
import folder_paths  # noqa: E402,F401
import comfy.model_management  # noqa: E402,F401
import torch  # noqa: E402

root = config["pack"]
name = os.path.basename(root)
spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"), submodule_search_locations=[root])
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
bridge = sys.modules[f"{name}.nodes.comfyui.bridge"]
memory = importlib.import_module(f"{name}.nodes.engine.memory")
engine = importlib.import_module(f"{name}.nodes.engine")
random_models = importlib.import_module(f"{name}.nodes.engine.random_models")

facts = bridge.device_facts()
precision = memory.resolve_precision("auto", facts.torch_device, memory.FileStorage("bf16", "bf16"), facts=facts)
models = random_models.build_random_models("tiny", dtype=torch.float32)
pipe = engine.USOPipeline(models, engine.EngineOptions(device=bridge.torch_device(), precision="fp32", facts=facts),
                          bridge.device_hooks())
seen = {"kind": facts.kind, "unet_dtype": str(facts.unet_dtype), "text_dtype": str(facts.text_dtype),
        "vae_dtype": str(facts.vae_dtype), "vae_device": facts.vae_device, "text_device": facts.text_device,
        "vram_state": facts.vram_state, "reserve_bytes": facts.reserve_bytes, "pin_allowed": facts.pin_allowed,
        "fp16_attention_fails": facts.fp16_attention_fails,
        "auto": {"compute": str(precision.compute), "text": str(precision.text), "vae": str(precision.vae)},
        "pipeline_facts_are_comfyuis": pipe.facts == facts, "plan": pipe.memory_plan.summary()}
print("PROBE " + json.dumps(seen))
