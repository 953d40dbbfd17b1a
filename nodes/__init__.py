"""The USO pack's code. Each part is a package (see ARCHITECTURE.md; the import rules between
them are in /.importlinter):

- `comfyui/`: the ComfyUI nodes (thin adapters) and `bridge.py`, the only importer of ComfyUI.
- `cli/`: the command line (`python -m nodes.cli`).
- `api.py`: the Python API, the face of the pack without ComfyUI.
- `jobs/`: manifests, planning jobs, the in-process and Ray runners, progress, the `Backend` type.
- `files/`: model files in ComfyUI folders, input images, PNGs with their parameters.
- `engine/`: USO on diffusers (weight files, the math, precision and memory). No ComfyUI.
- `remote/`: the fal and AIML clients. No ComfyUI.
- `model_catalog.py`: which file goes in which slot, shared by the nodes and the command line.
- `cancel.py`: `Cancelled`, the one exception of a cancelled run.
- `benchmarks/`: developer scripts that measure the engine (not tests, not nodes).
"""
