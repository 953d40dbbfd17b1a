"""Run inside ComfyUI's own Python with ComfyUI's source on sys.path (not collected by pytest):
imports ComfyUI's real modules (folder_paths, comfy.model_management, comfy.model_patcher,
comfy.utils, server) and the pack the way ComfyUI loads it, drives every ComfyUI-side branch of
nodes/comfyui/bridge.py, and prints what ComfyUI's own records showed as one JSON line.

    python bridge_probe.py CONFIG.json

CONFIG: {"comfyui": ComfyUI folder, "pack": pack folder, "models": a ComfyUI-like models folder
(the tiny models), "tokenizers": the tiny tokenizers' root, "work": an empty scratch folder}.
test_bridge_in_comfyui.py asserts on the printed observations.
"""
from __future__ import annotations

import asyncio
import gc
import importlib.util
import json
import os
import sys
import time

config = json.load(open(sys.argv[1]))
WORK = config["work"]
os.environ["USO_TOKENIZER_DIR"] = config["tokenizers"]
# ComfyUI's own command line: CPU, and a base directory of ours so nothing is written into ComfyUI.
sys.argv = ["main.py", "--cpu", "--base-directory", os.path.join(WORK, "base")]
sys.path.insert(0, config["comfyui"])
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
# What main.py imports next: ComfyUI's `utils` package, before comfy/nodes.py puts comfy/ (and
# its utils.py) on sys.path.
import utils.extra_config  # noqa: E402,F401
import folder_paths  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.utils  # noqa: E402
import server  # noqa: E402
import torch  # noqa: E402

seen: dict = {}


def load_pack():
    """What ComfyUI's load_custom_node does: the folder's __init__.py under the folder's name."""
    root = config["pack"]
    name = os.path.basename(root)
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return name, module


pack_name, pack = load_pack()
bridge = sys.modules[f"{pack_name}.nodes.comfyui.bridge"]
pipeline_cache = sys.modules[f"{pack_name}.nodes.comfyui.pipeline_cache"]
memory = importlib.import_module(f"{pack_name}.nodes.engine.memory")
engine = importlib.import_module(f"{pack_name}.nodes.engine")
random_models = importlib.import_module(f"{pack_name}.nodes.engine.random_models")
tokenizers = importlib.import_module(f"{pack_name}.nodes.engine.tokenizers")
seen["bridge_sees_comfyui"] = bridge._mm is mm and bridge._folder_paths is folder_paths


# ---------------------------------------------------------------------------------------------
# Model folders through folder_paths
# ---------------------------------------------------------------------------------------------

def touch(path: str, data: bytes = b"\0" * 16) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


unet_dir = os.path.join(WORK, "unets")
touch(os.path.join(unet_dir, "flux1-dev-Q8_0.gguf"))
touch(os.path.join(unet_dir, "sub", "flux1-dev.safetensors"))
touch(os.path.join(unet_dir, "notes.txt"))
os.symlink(unet_dir, os.path.join(unet_dir, "sub", "loop"))  # a folder that contains itself
folder_paths.add_model_folder_path("diffusion_models", unet_dir)
gguf_entry = folder_paths.folder_names_and_paths[bridge.GGUF_FOLDER]
seen["gguf_folder"] = {"extensions": sorted(gguf_entry[1]),
                       "shares_diffusion_models_list":
                           gguf_entry[0] is folder_paths.folder_names_and_paths["diffusion_models"][0]}
bridge.register_gguf_folder()  # a second call (another import) leaves ComfyUI's entry as it is
seen["gguf_folder"]["same_entry_after_second_call"] = \
    folder_paths.folder_names_and_paths[bridge.GGUF_FOLDER] is gguf_entry
t0 = time.perf_counter()
first = bridge.list_model_files("diffusion_models")
seen["listing"] = {"first": first, "seconds_with_symlink_loop": time.perf_counter() - t0}
later = os.path.join(unet_dir, "flux1-schnell.safetensors")
touch(later)
# ComfyUI's cached lists are checked against the folder's modification time (what its Refresh
# relies on); a file copied within the same clock tick would not change it, so step it.
os.utime(unet_dir, (time.time() + 5, time.time() + 5))
seen["listing"]["after_new_file"] = bridge.list_model_files("diffusion_models")
seen["listing"]["unknown_folder"] = bridge.list_model_files("no_such_folder")
seen["listing"]["unknown_folder_paths"] = bridge.model_folder_paths("no_such_folder")
diffusers_dir = os.path.join(WORK, "diffusers_models")
touch(os.path.join(diffusers_dir, "FLUX.1-dev", "model_index.json"), b"{}")
folder_paths.add_model_folder_path("diffusers", diffusers_dir)
seen["listing"]["diffusers"] = bridge.list_model_files("diffusers")
seen["resolved"] = bridge.resolve_model_path("diffusion_models", "flux1-dev-Q8_0.gguf") == \
    os.path.realpath(os.path.join(unet_dir, "flux1-dev-Q8_0.gguf"))
seen["user_directory"] = bridge.user_directory() == folder_paths.get_user_directory()

# Tokenizer folders: the ones ComfyUI ships, loaded by the engine.
shipped = bridge.shipped_tokenizer_dirs()
seen["tokenizers"] = {
    kind: {"folder": os.path.relpath(path, config["comfyui"]),
           "vocab": len(tokenizers.load_tokenizer(kind, [path]))}
    for kind, path in sorted(shipped.items())}


# ---------------------------------------------------------------------------------------------
# Cancel and progress
# ---------------------------------------------------------------------------------------------

bridge.request_interrupt()
seen["cancel"] = {"comfy_flag_after_request": mm.processing_interrupted(),
                  "bridge_sees_it": bridge.interrupt_requested()}
try:
    bridge.throw_if_interrupted()
    seen["cancel"]["raised"] = None
except Exception as exc:  # noqa: BLE001 - recording which exception ComfyUI's check raised
    seen["cancel"]["raised"] = type(exc).__module__ + "." + type(exc).__qualname__
seen["cancel"]["flag_after_raise"] = mm.processing_interrupted()
bridge.throw_if_interrupted()  # not cancelled: returns

ticks = []
comfy.utils.set_progress_bar_global_hook(
    lambda value, total, preview, node_id=None: ticks.append([value, total, node_id]))
bar = bridge.Progress(4, node_id="7")
bar.update()
bar.set(3)
bar.set(9, total=10)
seen["progress"] = ticks

# Progress text: first with no server (logged), then through a real PromptServer's message queue.
bridge.send_progress_text("before the server", "7")
loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)
prompt_server = server.PromptServer(loop)
bridge.send_progress_text("status: queued", "7")
loop.run_until_complete(asyncio.sleep(0))
sent = []
while not prompt_server.messages.empty():
    sent.append(prompt_server.messages.get_nowait())
seen["progress_text"] = [data.decode(errors="replace") for _event, data, _sid in sent]
server.PromptServer.instance = None


# ---------------------------------------------------------------------------------------------
# Memory: our modules in ComfyUI's records
# ---------------------------------------------------------------------------------------------

def records():
    """ComfyUI's current_loaded_models, one row per model, newest first (as ComfyUI keeps it)."""
    rows = []
    for loaded in mm.current_loaded_models:
        patcher = loaded.model
        rows.append({"model": type(patcher.model).__name__ if patcher is not None else None,
                     "ours": isinstance(patcher, bridge.USOModelPatcher),
                     "device": str(loaded.device),
                     "size": loaded.model_memory() if patcher is not None else None,
                     "loaded": loaded.model_loaded_memory() if patcher is not None else None})
    return rows


def native_taef1_vae():
    """A native ComfyUI model, made the way VAELoader makes "taef1" (random weights)."""
    import comfy.sd
    import comfy.taesd.taesd

    net = comfy.taesd.taesd.TAESD(latent_channels=16)
    sd = {f"taesd_encoder.{k}": v for k, v in net.taesd_encoder.state_dict().items()}
    sd.update({f"taesd_decoder.{k}": v for k, v in net.taesd_decoder.state_dict().items()})
    sd.update(vae_scale=torch.tensor(0.3611), vae_shift=torch.tensor(0.1159))
    return comfy.sd.VAE(sd=sd)


cpu = torch.device("cpu")
native = native_taef1_vae()
native.decode(torch.zeros(1, 16, 4, 4))  # VAE Decode: ComfyUI's load_models_gpu([its patcher])
seen["native_only"] = records()
seen["available_bytes"] = {"value": bridge.available_device_bytes(cpu),
                           "comfy_free": mm.get_free_memory(cpu), "native_loaded": native.patcher.loaded_size()}

seen["torch_device"] = bridge.torch_device()
# As pipeline_cache does: one set of hooks per pipeline (they hold its ComfyUI models).
models = random_models.build_random_models("tiny", dtype=torch.float32)
pipe = engine.USOPipeline(models, engine.EngineOptions(device="cpu", precision="fp32"), bridge.device_hooks())
module_bytes = {name: memory.module_bytes(m) for name, m in
                [("transformer", pipe.transformer), ("vae", pipe.vae), ("t5", pipe.t5), ("clip", pipe.clip),
                 ("siglip", pipe.siglip), ("projector", pipe.projector)]}
seen["module_bytes"] = module_bytes
seen["after_uso_load"] = records()
result = pipe.generate("a cat", width=32, height=32, steps=2, seeds=[1])
seen["after_uso_generate"] = records()
seen["image_shape"] = list(result.images.shape)

# What a native node's load_models_gpu does when the device is short of memory: ComfyUI's
# free_memory for more than is free (4 GiB more: RAM other processes give back meanwhile must not
# make it enough). It unloads in its own order, ours included.
unloaded = mm.free_memory(mm.get_free_memory(cpu) + (4 << 30), cpu)
seen["free_memory_unloaded"] = [type(lm.model.model).__name__ for lm in unloaded]
seen["after_free_memory"] = records()
patcher = bridge.USOModelPatcher  # (class) the unloaded patchers report nothing loaded now:
seen["unloaded_report_zero"] = all(lm.model.loaded_size() == 0 for lm in unloaded
                                   if isinstance(lm.model, patcher))
again = pipe.generate("a cat", width=32, height=32, steps=2, seeds=[1])
seen["same_image_after_unload"] = bool(torch.equal(again.images, result.images))
seen["after_second_generate"] = records()

# free_memory asks a model to give back only part of its memory when that is enough
# (LoadedModel.model_unload with memory_to_free below its loaded size): ours give back whole
# modules, so the answer is "unloaded" and ComfyUI drops the record, as free_memory does.
vae_record = next(lm for lm in mm.current_loaded_models if type(lm.model.model).__name__ == "USOAutoencoderKL")
seen["partial_request"] = {"loaded_before": vae_record.model_loaded_memory(),
                           "unloaded_whole": vae_record.model_unload(memory_to_free=1024),
                           "loaded_after": vae_record.model.loaded_size()}
mm.current_loaded_models.remove(vae_record)
del vae_record

mm.unload_all_models()  # what /free with unload_models and "Unload Models" call
seen["after_unload_all"] = records()

# Placement modes: ComfyUI is told what each needs on the device while it runs.
streamed = engine.USOPipeline(random_models.build_random_models("tiny", dtype=torch.float32),
                              engine.EngineOptions(device="cpu", precision="fp32", memory="group_offload"),
                              bridge.device_hooks())
streamed.generate("a cat", width=32, height=32, steps=1, seeds=[1])
ours = {type(lm.model.model).__name__: lm.model_memory() for lm in mm.current_loaded_models
        if isinstance(lm.model, patcher)}
seen["group_offload"] = {"reported": ours,
                         "transformer_bytes": memory.module_bytes(streamed.transformer),
                         "transformer_device_bytes": streamed.placement.device_bytes(streamed.transformer),
                         "t5_device_bytes": streamed.placement.device_bytes(streamed.t5)}
kept = next(lm.model for lm in mm.current_loaded_models if isinstance(lm.model, patcher))
kept_name = type(kept.model).__name__
del streamed, pipe
gc.collect()
# Dropping a pipeline takes its modules out of ComfyUI's records (the finalizer ComfyUI put on
# each model); a patcher someone still holds stays, reporting nothing (its pipeline is gone).
seen["after_pipelines_dropped"] = records()
seen["kept"] = kept_name
seen["orphan_patcher"] = {"size": kept.model_size(), "loaded": kept.loaded_size(),
                          "detach_returns_holder": kept.detach() is kept.model}

print("PROBE " + json.dumps(seen))
