"""Remote USO on fal.ai (`fal-ai/uso`, queue API) and AIML API (`bytedance/uso`), over plain HTTP.

Never imports ComfyUI: the node passes Cancel, status text and progress in as callables (Hooks).

Configuration (environment):
  FAL_KEY (or FAL_KEY_ID + FAL_KEY_SECRET)  fal key, 'key_id:key_secret'
  AIML_API_KEY (or AIMLAPI_KEY)             AIML key
  USO_REMOTE_KEYS_FILE                      JSON key file {"fal": "...", "aiml": "..."}; default
                                            <ComfyUI user directory>/uso_remote_keys.json
  USO_FAL_QUEUE_URL                         fal queue base URL, default https://queue.fal.run
  USO_AIML_URL                              AIML base URL, default https://api.aimlapi.com
Environment keys win over the file; the file is read on every run.
"""
from .errors import Cancelled, InputError, KeyProblem, ProviderError, RemoteError, RemoteTimeout
from .hooks import Hooks
from .pipeline import RemoteInputs, RemoteResult, Settings, generate
from .request import OUTPUT_FORMATS, PROVIDERS, SIZE_CHOICES

__all__ = [
    "Cancelled", "InputError", "KeyProblem", "ProviderError", "RemoteError", "RemoteTimeout",
    "Hooks", "RemoteInputs", "RemoteResult", "Settings", "generate",
    "OUTPUT_FORMATS", "PROVIDERS", "SIZE_CHOICES",
]
