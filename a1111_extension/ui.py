"""The widgets: the Erasure accordion (txt2img / img2img) and the Erasure tab (training).

Plain gradio components that work with A1111's gradio 3.41 and Forge's gradio 4; every action
calls ``settings``, ``library`` or ``training``.
"""

from __future__ import annotations

import threading

import gradio as gr

from shared_core import hirm, nlce
from shared_core.common import STRENGTH_HELP, STRENGTH_RANGE
from shared_core.errors import HirmError
from shared_core.hirm.config import setting_help as hirm_help
from shared_core.nlce.config import setting_help as nlce_help

from . import host, library, training
from .settings import (MAX_PATCHES, NLCE_KEY, NLCE_KEYS, NO_PATCH, PATCHES_KEY, SCHEDULES, UI_ARGS, UI_DEFAULTS,
                       paste_values)

_cancel = threading.Event()


def _patch_choices() -> list[str]:
    return [NO_PATCH] + library.list_patch_files(host.patch_folder())


def _pasted(name: str):
    """Infotext paste function for widget ``name`` (A1111 calls it with the parsed parameters)."""
    def value(params: dict):
        try:
            values = paste_values(params)
        except HirmError:
            values = None
        if values is None:
            return False if name == "enabled" else None  # no erasure in this infotext: off, others untouched
        return values[name]
    return value


def settings() -> list[tuple]:
    """The Erasure section of the webui's Settings (``host.add_settings``): the accordion's starting values."""
    return [
        ("erasure_patch_folder", "", "Folder of erasure patches (empty: models/erasure_patches)", None, None),
        ("erasure_default_strength", UI_DEFAULTS["strength_1"], "Starting strength of each erasure patch slot", gr.Slider,
         {"minimum": STRENGTH_RANGE[0], "maximum": STRENGTH_RANGE[1], "step": 0.05}),
        ("erasure_nlce_preset", UI_DEFAULTS["preset"], "Starting NLCE preset", gr.Dropdown, {"choices": list(nlce.NLCE_PRESETS)}),
        ("erasure_nlce_schedule", UI_DEFAULTS["schedule"], "Starting NLCE schedule (faithful: 2x cost)", gr.Dropdown,
         {"choices": list(SCHEDULES)}),
    ]


def starting_values() -> dict:
    """``UI_DEFAULTS`` with the user's Settings laid over them (read when the UI is built)."""
    out = dict(UI_DEFAULTS)
    strength = host.option("erasure_default_strength", UI_DEFAULTS["strength_1"])
    out.update({f"strength_{i}": strength for i in range(1, MAX_PATCHES + 1)})
    out["preset"] = host.option("erasure_nlce_preset", UI_DEFAULTS["preset"])
    out["schedule"] = host.option("erasure_nlce_schedule", UI_DEFAULTS["schedule"])
    return out


def accordion(elem_id) -> tuple[list, list, list[str]]:
    """(components in ``UI_ARGS`` order, infotext_fields, paste_field_names) for ``Script.ui``."""
    choices = _patch_choices()
    D = starting_values()
    with host.input_accordion(D["enabled"], "Erasure", elem_id("enabled")) as enabled:
        slots = []
        for i in range(1, MAX_PATCHES + 1):
            with gr.Row():
                slots.append(gr.Dropdown(label=f"erasure patch {i} (models/erasure_patches)", choices=choices, value=D[f"patch_{i}"],
                                         allow_custom_value=True, elem_id=elem_id(f"patch_{i}")))
                slots.append(gr.Slider(label=f"patch {i} strength ({STRENGTH_HELP})", minimum=STRENGTH_RANGE[0],
                                       maximum=STRENGTH_RANGE[1], step=0.05, value=D[f"strength_{i}"], elem_id=elem_id(f"strength_{i}")))
        refresh = gr.Button(value="Refresh patch list", elem_id=elem_id("refresh"))
        use_nlce = gr.Checkbox(label="NLCE: erase concepts in the UNet's cross-attention while sampling (SD1.x, SDXL; no training)",
                               value=D["nlce"], elem_id=elem_id("nlce"))
        concepts = gr.Textbox(label="NLCE concepts to erase (one per line)", lines=2, value=D["concepts"],
                              elem_id=elem_id("concepts"))
        neighbors = gr.Textbox(label="neighbours to keep intact ('auto' mines them offline; empty: none)", value=D["neighbors"],
                               elem_id=elem_id("neighbors"))
        with gr.Row():
            preset = gr.Dropdown(label="NLCE preset", choices=list(nlce.NLCE_PRESETS), value=D["preset"], elem_id=elem_id("preset"))
            beta = gr.Slider(label="beta", minimum=0.0, maximum=1.5, step=0.05, value=D["beta"], elem_id=elem_id("beta"),
                             info=nlce_help("beta", False))
            gamma = gr.Slider(label="gamma (set by the preset)", minimum=0.0, maximum=1.5, step=0.05,
                              value=nlce.make_nlce_config(D["preset"]).gamma, elem_id=elem_id("gamma"),
                              info=nlce_help("gamma", False))
            schedule = gr.Dropdown(label="schedule (faithful: 2x cost)", choices=list(SCHEDULES), value=D["schedule"],
                                   elem_id=elem_id("schedule"), info=nlce_help("schedule", False))
    dropdowns = slots[0::2]
    refresh.click(fn=lambda: [gr.update(choices=_patch_choices()) for _ in dropdowns], inputs=[], outputs=dropdowns)

    def preset_gamma(evt: gr.SelectData):  # on a user's choice only, so a pasted gamma is not overwritten
        return nlce.make_nlce_config(evt.value).gamma

    preset.select(fn=preset_gamma, inputs=[], outputs=[gamma])
    components = [enabled, *slots, use_nlce, concepts, neighbors, preset, beta, gamma, schedule]
    fields = [(c, _pasted(name)) for c, name in zip(components, UI_ARGS)]
    return components, fields, [PATCHES_KEY, NLCE_KEY, *NLCE_KEYS.values()]


def _train(concepts, method, anchor, preset, steps, seed, name, overwrite):
    _cancel.clear()

    def work(progress):
        with host.queue_lock():
            env = host.env()
            return training.train(host.sd_model(), concepts=concepts, method=method, anchor=anchor, preset=preset,
                                  steps=steps, seed=seed, name=name, overwrite=overwrite, folder=env.patch_folder,
                                  device=env.device, progress=progress, should_cancel=_cancel.is_set)

    yield from training.run_in_background(work)


def training_tab():
    """``script_callbacks.on_ui_tabs`` callback: [(blocks, title, elem_id)]."""
    with gr.Blocks(analytics_enabled=False) as tab:
        gr.Markdown("Train a **HiRM** erasure patch on the loaded model's text encoders (SD1.x: CLIP-L; SDXL: CLIP-L and "
                    "CLIP-G, one patch; a refiner: its CLIP-G). "
                    "The loaded model is not changed; the patch is saved in `models/erasure_patches` and appears in the "
                    "Erasure accordion of txt2img / img2img after a refresh.")
        with gr.Row():
            with gr.Column():
                concepts = gr.Textbox(label="concepts to erase (one per line, as many as you like; 'nudity' = the nudity "
                                            "keyword prompt)", lines=5, max_lines=40,
                                      info="several concepts train one patch together, with a term that keeps everyday "
                                           "prompts unchanged (docs/hirm-lists.md)")
                with gr.Row():
                    method = gr.Dropdown(label="method", choices=list(hirm.METHODS), value="random", info=hirm_help("method", False))
                    preset = gr.Dropdown(label="preset (learning rate and steps)", choices=list(hirm.PRESETS), value="style")
                anchor = gr.Textbox(label="anchor (superordinate method only, e.g. 'painting', 'building')",
                                    info=hirm_help("anchor", False))
                with gr.Row():
                    steps = gr.Number(label="steps (0: the preset's)", value=0, precision=0)
                    seed = gr.Number(label="seed", value=42, precision=0)
                with gr.Row():
                    name = gr.Textbox(label="output name")
                    overwrite = gr.Checkbox(label="overwrite an existing file", value=False)
                with gr.Row():
                    start = gr.Button("Train", variant="primary")
                    cancel = gr.Button("Cancel")
            with gr.Column():
                status = gr.Textbox(label="progress", interactive=False)
                report = gr.Textbox(label="text-level report", lines=8, interactive=False)
        start.click(fn=_train, inputs=[concepts, method, anchor, preset, steps, seed, name, overwrite], outputs=[status, report],
                    api_name="hirm_erasure_train")  # for API clients: gradio_client predict(..., api_name="/hirm_erasure_train")
        cancel.click(fn=_cancel.set, inputs=[], outputs=[], queue=False)
        with gr.Accordion("Download a patch from the Hugging Face Hub", open=False):
            with gr.Row():
                repo = gr.Textbox(label="Hub repository (org/name)")
                wanted = gr.Textbox(label="concept or file name (e.g. 'Van Gogh' or 'van-gogh.safetensors')")
                replace = gr.Checkbox(label="overwrite an existing file", value=False)
            download = gr.Button("Download")
            pulled = gr.Textbox(label="download", interactive=False)
        download.click(fn=_pull, inputs=[repo, wanted, replace], outputs=[pulled], api_name="hirm_erasure_pull")
    return [(tab, "Erasure", "hirm_erasure")]


def _pull(repo, wanted, overwrite):
    try:
        return library.pull(host.patch_folder(), repo, wanted, overwrite=bool(overwrite))
    except HirmError as e:
        return str(e)
