"""What an evaluation renders (cases), and where each finished case is kept (resumable, shareable between processes).

A case is one image: (prompt, seed, guidance, defence, strength). Its PNG and its record (scores, seconds) are written
atomically under ``DIR/cases/``, the record last, so a case counts as done exactly when its record exists: a rerun
after an interruption, another shard, or another process renders only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

from ..errors import HirmError
from ..files import atomic_write, check_writable_folder, sweep_stale_temporaries, write_failure
from .suites import Prompt

DEFENCES = ("none", "patch", "nlce", "both")
FORMAT = "hirm-eval"


@dataclass(frozen=True)
class Case:
    prompt: str
    group: str
    seed: int
    guidance: float
    defence: str          # none, patch, nlce, both
    strength: float = 1.0  # the patches' strength factor (the strength sweep)

    @property
    def id(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def reference(self) -> "Case":
        """The same prompt and seed without any defence: what this case's image is compared with."""
        return Case(self.prompt, self.group, self.seed, self.guidance, "none")


def plan(prompts: list[Prompt], seeds: list[int], guidance: float, defences: list[str],
         sweep: list[float]) -> list[Case]:
    """Every case, in a fixed order: per prompt and seed (a prompt's own seed/guidance when its suite fixes them), each
    defence; then the strength sweep of the patches on the first prompt and seed (strength 0 is the plain image)."""
    cases = []
    for p in prompts:
        for seed in ([p.seed] if p.seed is not None else seeds):
            g = p.guidance if p.guidance is not None else guidance
            cases += [Case(p.text, p.group, seed, g, d) for d in defences]
    if sweep and "patch" in defences and prompts:
        first = cases[0]
        cases += [Case(first.prompt, first.group, first.seed, first.guidance, "patch", s) for s in sweep
                  if s not in (0.0, 1.0)]
    return cases


def shard_of(cases: list[Case], index: int, count: int) -> list[Case]:
    """The cases shard ``index`` of ``count`` renders: every ``count``-th, so that each shard gets every kind."""
    return cases[index::count]


class Store:
    """The evaluation folder: ``eval.json`` (the settings; what marks the folder as ours), ``cases/`` (one PNG and one
    record per finished case), and the outputs the merge writes (grid.png, strength.png, metrics.json, report.html)."""

    def __init__(self, folder: str, settings: dict):
        self.folder, self.settings = folder, settings
        self.fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.cases = os.path.join(folder, "cases")

    def open(self, create: bool = True) -> "Store":
        """Claim the folder: a new one, or one an earlier run of the same settings left (the run then resumes).
        ``create=False`` only checks that it could (before a model is loaded), creating nothing."""
        marker = os.path.join(self.folder, "eval.json")
        if os.path.lexists(self.folder):
            if not os.path.isdir(self.folder) or os.path.islink(self.folder):
                raise HirmError(f"--out {self.folder} exists and is not a folder; give a new folder name")
            if not os.path.isfile(marker):
                if os.listdir(self.folder):
                    raise HirmError(f"--out {self.folder} is a folder this tool did not make (no eval.json); give a new "
                                    "folder name: nothing in it is ever written over")
            else:
                held = _read_json(marker)
                if held.get("format") != FORMAT:
                    raise HirmError(f"--out {self.folder}/eval.json is not an evaluation of this tool; give a new folder name")
                if held.get("fingerprint") != self.fingerprint:
                    raise HirmError(f"--out {self.folder} holds an evaluation with other settings; give a new folder name "
                                    "(or rerun with the same settings to resume it)")
                self._check_writable()
                if create:
                    sweep_stale_temporaries(self.cases)  # what a killed run left (case writes do not sweep each time)
                return self
        self._check_writable()
        if not create:
            return self
        try:
            os.makedirs(self.cases, exist_ok=True)
        except OSError as e:
            raise HirmError(f"--out {self.folder}: cannot make it ({write_failure(e)}); choose a folder you can write to") from None
        body = json.dumps({"format": FORMAT, "fingerprint": self.fingerprint, "settings": self.settings}, indent=2,
                          sort_keys=True, default=str).encode()
        try:
            atomic_write(marker, lambda f: f.write(body), what="evaluation settings")
        except HirmError:
            if not (os.path.isfile(marker) and _read_json(marker).get("fingerprint") == self.fingerprint):
                raise  # another process of the same run may have written it first: that is fine
        return self

    def _check_writable(self) -> None:
        """A folder in a read-only place (or one without permission) is said before any loading, not after."""
        check_writable_folder(self.folder, f"--out {self.folder}")
        if os.path.isdir(self.cases):
            check_writable_folder(self.cases, f"--out {self.folder}")

    def path(self, case: Case, ext: str) -> str:
        return os.path.join(self.cases, f"{case.id}.{ext}")

    def done(self, case: Case) -> bool:
        return os.path.isfile(self.path(case, "json"))

    def save(self, case: Case, image, record: dict) -> None:
        """The case's PNG, then its record (the record marks it done). Atomic, not fsynced: a power cut may lose a case,
        which the next run renders again; the folder's stale temporaries were swept when it was opened."""
        fast = dict(overwrite=True, is_ours=lambda p: True, durable=False, sweep=False)
        atomic_write(self.path(case, "png"), lambda f: image.save(f, format="PNG"), what="case image", **fast)
        body = json.dumps({"case": asdict(case), **record}, sort_keys=True).encode()
        atomic_write(self.path(case, "json"), lambda f: f.write(body), what="case record", **fast)

    def record(self, case: Case) -> dict:
        return _read_json(self.path(case, "json"))

    def image(self, case: Case):
        from PIL import Image

        with Image.open(self.path(case, "png")) as im:
            return im.convert("RGB")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise HirmError(f"{path}: cannot be read ({type(e).__name__}); the evaluation folder is damaged: give a new --out") from None
    return value if isinstance(value, dict) else {}
