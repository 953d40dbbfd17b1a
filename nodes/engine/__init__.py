"""USO on diffusers + transformers. No ComfyUI import anywhere in this package.

    from nodes.engine import USOPipeline, ModelFiles, EngineOptions
    pipe = USOPipeline.from_files(ModelFiles(transformer=..., siglip=..., uso_lora=..., projector=...,
                                  vae=..., t5=..., clip_l=...))
    style = pipe.encode_style([Image.open("style.png")])
    subject = pipe.encode_subject([Image.open("me.jpg")])
    result = pipe.generate("a portrait", styles=style, subjects=subject, seeds=[3407])
"""
from .errors import InputError, ModelFileError, OutOfMemoryError, TokenizerNotFoundError, USOError
from .model_set import LoadedModels, ModelFiles, load_models
from .pipeline import (EngineOptions, GenerationResult, StyleEncoding, SubjectEncoding,
                       USOPipeline)

__all__ = ["USOPipeline", "ModelFiles", "LoadedModels", "load_models", "EngineOptions", "StyleEncoding", "SubjectEncoding",
           "GenerationResult", "USOError", "ModelFileError", "InputError", "OutOfMemoryError",
           "TokenizerNotFoundError"]
