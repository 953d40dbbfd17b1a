"""ComfyUI entry point of the USO node pack; the node classes live in `nodes/comfyui/`.

ComfyUI imports this file as a package named after the pack's folder, so everything inside the
pack is imported relatively.
"""
# pytest, collecting the pack folder, imports this file as a bare module (no package) when the
# folder's name is not a Python identifier, as with the install name `comfyui-uso`: there is no
# ComfyUI to register nodes with then, and a relative import would fail every test at setup.
if __package__:
    from .nodes.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    # Served at /extensions/<pack folder>/: the node help pages (docs/<node id>.md) the frontend's
    # node library shows. No .js there, so no frontend code is loaded.
    WEB_DIRECTORY = "./web"

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
