"""ComfyUI nodes for HiRM erasure patches and NLCE. ``core`` needs no ComfyUI; the node files and
``extension`` import ComfyUI's ``comfy_api`` and are loaded only inside ComfyUI."""
