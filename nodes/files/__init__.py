"""Files in and out, without models: finding model files in ComfyUI folders (`model_paths.py`),
reading input images (`image_files.py`), PNGs with their parameters (`png_info.py`)."""
