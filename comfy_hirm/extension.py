"""The V3 extension: the node list and the entry point ComfyUI calls (through the root ``__init__.py``)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import host
from .nodes_apply import ApplyEncoderPatch
from .nodes_files import LoadErasurePatch, LoadErasurePatchFromHub, SaveErasurePatch
from .nodes_nlce import NlceGate
from .nodes_train import TrainErasurePatch

NODES = [TrainErasurePatch, ApplyEncoderPatch, SaveErasurePatch, LoadErasurePatch, LoadErasurePatchFromHub, NlceGate]


class HirmExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> HirmExtension:
    host.register_folder()
    return HirmExtension()
