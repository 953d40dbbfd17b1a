"""The one exception a cancelled run raises, wherever it runs.

It sits below the engine and remote (it imports nothing), so the local API, the remote clients,
the job runners and the ComfyUI bridge outside ComfyUI raise and catch the same class without the
engine and remote importing each other. Inside ComfyUI the bridge raises ComfyUI's own interrupt
exception instead, which is what ComfyUI's executor expects.
"""


class Cancelled(Exception):
    """The user cancelled the run: Cancel in ComfyUI, `cancel()` in the API, Ctrl-C on the command
    line. Not an error of the inputs or the models: nothing is wrong, the run was stopped."""
