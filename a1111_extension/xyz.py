"""X/Y/Z plot axes for the Erasure accordion (the webui's built-in ``xyz_grid.py`` script).

An axis value is kept on the job's ``p`` (``OVERRIDES``, as the webui's own axes set fields of
``p``) and laid over the accordion's values when the Erasure script starts the job; a cell with an
axis value is an erasure job even where the accordion itself is closed.
"""

from __future__ import annotations

from .settings import MAX_PATCHES

OVERRIDES = "hirm_erasure_overrides"  # attribute of p: {UI_ARGS name: value}
ON_OFF = ("on", "off")


def axes() -> list[tuple[str, type, str, tuple | None]]:
    """(label, value type, UI_ARGS name, choices or None) of each axis."""
    out = [(f"[Erasure] patch {i} strength", float, f"strength_{i}", None) for i in range(1, MAX_PATCHES + 1)]
    return out + [("[Erasure] NLCE", str, "nlce", ON_OFF), ("[Erasure] NLCE beta", float, "beta", None),
                  ("[Erasure] NLCE gamma", float, "gamma", None)]


def override(p, name: str, value) -> None:
    if name == "nlce":
        text = str(value).strip().lower()
        if text not in ON_OFF:
            raise ValueError(f"the Erasure NLCE axis takes 'on' or 'off', got {value!r}")
        value = text == "on"
    table = getattr(p, OVERRIDES, None)
    if table is None:
        table = {}
        setattr(p, OVERRIDES, table)
    table[name] = value


def overrides(p) -> dict:
    return dict(getattr(p, OVERRIDES, None) or {})


def add_axes(xyz_module) -> int:
    """Append the Erasure axes to ``xyz_module.axis_options`` once; returns how many were added."""
    have = {getattr(option, "label", None) for option in xyz_module.axis_options}
    added = 0
    for label, kind, name, choices in axes():
        if label in have:
            continue
        apply = (lambda n: lambda p, x, xs: override(p, n, x))(name)
        options = {"choices": (lambda c: lambda: list(c))(choices)} if choices else {}
        xyz_module.axis_options.append(xyz_module.AxisOption(label, kind, apply, **options))
        added += 1
    return added
