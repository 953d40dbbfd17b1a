"""Node registry: every node class of the pack, keyed by its permanent id, and the V3 extension
ComfyUI loads them through (`comfy_entrypoint`, exported by the pack's root __init__.py)."""
from .bridge import ComfyExtension, log
from .encode_nodes import NODE_CLASSES as _encode_nodes
from .generate_node import NODE_CLASSES as _generate_nodes
from .load_node import NODE_CLASSES as _load_nodes
from .lora_node import NODE_CLASSES as _lora_nodes
from .remote_node import NODE_CLASSES as _remote_nodes

# One import per node module; each module lists its classes in NODE_CLASSES.
_NODE_CLASSES: list[type] = [*_load_nodes, *_lora_nodes, *_encode_nodes, *_generate_nodes, *_remote_nodes]

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _cls in _NODE_CLASSES:
    _schema = _cls.GET_SCHEMA()
    if _schema.node_id in NODE_CLASS_MAPPINGS:
        raise RuntimeError(f"USO: two node classes share the id {_schema.node_id}")
    NODE_CLASS_MAPPINGS[_schema.node_id] = _cls
    NODE_DISPLAY_NAME_MAPPINGS[_schema.node_id] = _schema.display_name


class USOExtension(ComfyExtension):
    async def get_node_list(self) -> list[type]:
        return list(_NODE_CLASSES)


async def comfy_entrypoint() -> USOExtension:
    return USOExtension()


__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "comfy_entrypoint", "log"]
