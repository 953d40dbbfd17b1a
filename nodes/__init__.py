"""The USO pack's code. Each part is a package (see ARCHITECTURE.md):

- `engine/`: USO on diffusers (weight files, the math, precision and memory). No ComfyUI.
- `remote/`: the fal and AIML clients. No ComfyUI.
- `comfyui/`: the ComfyUI nodes (thin adapters) and `bridge.py`, the only importer of ComfyUI.
- `cli/`: the command line, batch manifests and their runner, finding model files.
- `api.py`: the Python API, the face of the pack without ComfyUI.
- `model_catalog.py`: which file goes in which slot, shared by the nodes and the command line.
- `benchmarks/`: developer scripts that measure the engine (not tests, not nodes).
"""
