"""ComfyUI entry point of the USO node pack.

ComfyUI imports this file under a module name derived from the folder path, so everything
inside the pack is imported relatively.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
