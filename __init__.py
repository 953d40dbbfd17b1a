"""ComfyUI entry point of the USO node pack; the node classes live in `nodes/comfyui/`.

ComfyUI imports this file as a package named after the pack's folder, so everything inside the
pack is imported relatively.
"""
# pytest, collecting the pack folder, imports this file as a bare module (no package) when the
# folder's name is not a Python identifier, as with the install name `comfyui-uso`: there is no
# ComfyUI to register nodes with then, and a relative import would fail every test at setup.
if __package__:
    # ComfyUI V3 nodes, registered through the extension (a module with NODE_CLASS_MAPPINGS would be
    # loaded the V1 way instead, and its comfy_entrypoint ignored).
    from .nodes.comfyui import comfy_entrypoint

    # Served at /extensions/<pack folder>/: the node help pages (docs/<node id>.md) and js/, which
    # the frontend loads (the remote node's fresh seed control starts at "fixed").
    WEB_DIRECTORY = "./web"

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
