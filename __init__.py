"""ComfyUI entry point: ComfyUI imports this package from custom_nodes/<folder>/."""
