"""USO on diffusers + transformers. No ComfyUI import anywhere in this package.

    from nodes.engine import USOPipeline, ModelFiles, EngineOptions
    pipe = USOPipeline(ModelFiles(transformer=..., siglip=..., uso_lora=..., projector=...,
                                  vae=..., t5=..., clip_l=...))
    style = pipe.encode_style([Image.open("style.png")])
    subject = pipe.encode_subject([Image.open("me.jpg")])
    result = pipe.generate("a portrait", styles=style, subjects=subject, seeds=[3407])
"""
from .errors import InputError, ModelFileError, OutOfMemoryError, TokenizerNotFoundError, USOError
from .pipeline import (EngineOptions, GenerationResult, ModelFiles, StyleEncoding, SubjectEncoding,
                       USOPipeline)

__all__ = ["USOPipeline", "ModelFiles", "EngineOptions", "StyleEncoding", "SubjectEncoding",
           "GenerationResult", "USOError", "ModelFileError", "InputError", "OutOfMemoryError",
           "TokenizerNotFoundError"]
