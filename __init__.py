"""ComfyUI entry point of the HiRM / NLCE concept-erasure pack (custom_nodes/<this folder>).

Outside ComfyUI (pytest, pip installs) there is no ``comfy_api`` and this file defines nothing.
"""

try:
    import comfy_api.latest  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    pass
else:
    from .comfy_hirm.extension import comfy_entrypoint  # noqa: F401
