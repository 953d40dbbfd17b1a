"""Node registry: every node class of the pack, keyed by its permanent id."""
from .bridge import log
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
    if _cls.NODE_ID in NODE_CLASS_MAPPINGS:
        raise RuntimeError(f"USO: two node classes share the id {_cls.NODE_ID}")
    NODE_CLASS_MAPPINGS[_cls.NODE_ID] = _cls
    NODE_DISPLAY_NAME_MAPPINGS[_cls.NODE_ID] = _cls.DISPLAY_NAME

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "log"]
