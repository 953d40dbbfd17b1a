"""Jobs below the command line and the Python API (which both import this part; it imports
neither): where jobs run (`backend.py`), manifests and their checks (`manifest.py`), the jobs of
a run (`plan.py`), the in-process runner (`runner.py`) and its Ray twin (`ray_runner.py`), and the
progress bars of a batch (`progress.py`)."""
