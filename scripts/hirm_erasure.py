"""AUTOMATIC1111 / Forge entry of the HiRM / NLCE erasure extension.

The webui runs every ``scripts/*.py`` of an extension with the extension's root on ``sys.path``
(A1111 only while loading), so the packages beside this folder are imported here, once, at load.
"""

from a1111_extension.script import ErasureScript, register_callbacks  # noqa: F401  (the webui registers ErasureScript)

register_callbacks()
