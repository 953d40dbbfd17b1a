"""USO from a shell: `python -m nodes.cli` (`command.py`), batch manifests (`manifest.py`) and
their runner (`batch.py`), finding model files in ComfyUI folders (`model_paths.py`), reading
input images (`image_files.py`) and writing PNGs with their parameters (`png_info.py`)."""
