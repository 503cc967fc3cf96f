"""AUTOMATIC1111 / Forge runs this with the webui's Python before loading the extension.

It installs, with the webui's own pip helper, only the packages the extension imports that are
missing. Packages already present are left at the version the webui pinned (never upgraded), and
torch is never touched: the webui brings its own build.
"""

import launch

# what a1111_extension and the parts of shared_core it uses import (the diffusers host and the CLI are not needed)
REQUIREMENTS = {"transformers": "transformers>=4.30", "safetensors": "safetensors>=0.3"}

for name, spec in REQUIREMENTS.items():
    if not launch.is_installed(name):
        launch.run_pip(f'install "{spec}"', f"{spec} for the hirm-erasure extension")
