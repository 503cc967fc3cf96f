"""Shared core of the HiRM/NLCE concept-erasure toolkit: no host (UI) code lives here.

Public entry points:
- ``shared_core.loading.load_text_encoder``: a CLIP text encoder from a checkpoint, folder or Hub id
- ``shared_core.hirm.train_patch``: train a HiRM erasure patch
- ``shared_core.patch``: patch files (``load_patch``/``save_patch``) and ``apply_patch``/``patched``
"""

__version__ = "0.1.0"
