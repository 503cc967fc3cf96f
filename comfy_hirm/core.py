"""The core as the nodes reach it, and nothing else.

Inside ComfyUI the pack is imported as the package ``custom_nodes/<folder>``, so the core is its
sibling package ``..shared_core``; with ``pip install`` (tests, the CLI) it is the top-level
``shared_core``. Every piece of logic lives there; the nodes only translate widgets to its calls.
"""

try:
    from ..shared_core import common, encoders, hirm, hosting, hub, nlce, patch as patches, report  # noqa: F401
    from ..shared_core.adapters import joint_patcher, patcher  # noqa: F401
    from ..shared_core.errors import HirmError, NlceError, PatchMismatchError  # noqa: F401
except ImportError:  # not inside a ComfyUI custom_nodes package
    from shared_core import common, encoders, hirm, hosting, hub, nlce, patch as patches, report  # noqa: F401
    from shared_core.adapters import joint_patcher, patcher  # noqa: F401
    from shared_core.errors import HirmError, NlceError, PatchMismatchError  # noqa: F401
