"""Jobs below the command line and the Python API: manifests and their checks (`manifest.py`),
the in-process runner (`runner.py`) and its Ray twin (`ray_runner.py`)."""
