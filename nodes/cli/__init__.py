"""USO from a shell: `python -m nodes.cli` (`command.py`). The jobs it runs are `nodes.jobs`'."""
