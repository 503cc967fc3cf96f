"""Install hook, shared by two hosts that both run a root ``install.py``.

AUTOMATIC1111 / Forge run it with the webui's Python before loading the extension: it installs,
with the webui's own pip helper, only the packages the extension imports that are missing.
Packages already present stay at the version the webui pinned (never upgraded), and torch is never
touched: the webui brings its own build.

ComfyUI Manager runs it too, after ``pip install -r requirements.txt``, with ComfyUI's Python. There
is no ``launch`` module there and nothing is left to do, so it exits quietly with status 0.
"""

try:
    import launch  # only inside AUTOMATIC1111 / Forge
except ImportError:
    launch = None

# what a1111_extension and the parts of shared_core it uses import (the diffusers host and the CLI are not needed)
REQUIREMENTS = {"transformers": "transformers>=4.30", "safetensors": "safetensors>=0.3"}

if launch is not None and hasattr(launch, "run_pip"):
    for name, spec in REQUIREMENTS.items():
        if not launch.is_installed(name):
            launch.run_pip(f'install "{spec}"', f"{spec} for the hirm-erasure extension")
