"""The Erasure script as the webui sees it: an always-visible accordion in txt2img and img2img, plus
the Erasure tab, the model-load watch and the X/Y/Z plot axes registered by ``register_callbacks``.

Every hook only forwards to ``jobs`` (the work) and ``ui`` (the widgets, imported when the UI is
built: gradio is needed only there).
"""

from __future__ import annotations

from . import host, jobs, xyz


class ErasureScript(host.Script):
    def title(self):
        return "Erasure"

    def show(self, is_img2img):
        return host.AlwaysVisible

    def ui(self, is_img2img):
        from . import ui

        components, self.infotext_fields, self.paste_field_names = ui.accordion(self.elem_id)
        return components

    def process(self, p, *args):
        jobs.begin(p, args, host.env())

    def process_batch(self, p, *args, **kwargs):
        jobs.batch(p)

    def process_before_every_sampling(self, p, *args, **kwargs):  # Forge only
        jobs.before_sampling(p)

    def postprocess(self, p, processed, *args):
        jobs.finish(p)


def training_tab():
    from . import ui

    return ui.training_tab()


def settings_section():
    from . import ui

    host.add_settings(ui.settings())


def register_callbacks() -> None:
    """Run by the entry file on every (re)load of the scripts: the webui clears callbacks before loading them."""
    host.register(on_ui_tabs=training_tab, on_model_loaded=jobs.model_loaded, on_xyz_grid=xyz.add_axes,
                  on_ui_settings=settings_section)
