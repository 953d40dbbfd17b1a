"""The pack's own socket types (ComfyUI V3 custom types), one definition each."""
from .bridge import io

USOModel = io.Custom("USO_MODEL")      # a loaded USOPipeline (or a LoRA view of it)
USOStyle = io.Custom("USO_STYLE")      # StyleEncoding: style tokens for USO Generate
USOSubject = io.Custom("USO_SUBJECT")  # SubjectEncoding: reference latents for USO Generate


def unique_id(cls) -> str | None:
    """The running node's id (ComfyUI fills the hidden input on the class clone it executes)."""
    return cls.hidden.unique_id if cls.hidden is not None else None
