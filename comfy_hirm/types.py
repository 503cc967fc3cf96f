"""The pack's category and its custom socket type."""

from comfy_api.latest import io

CATEGORY = "erasure"
ErasurePatch = io.Custom("ERASURE_PATCH")
