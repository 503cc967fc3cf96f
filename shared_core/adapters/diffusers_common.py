"""What NLCE's two diffusers adapters share: the handle (install, remove, the prompts it saw) and the operators.

``NlceHandle`` wraps the pipeline's ``encode_prompt`` (outside the denoiser: it records the prompt's rows, their words
and the negative prompt's rows, and readies the session on the device the pipeline encodes on) and the denoiser's
``forward`` (a subclass's ``_forward``). Inside a denoiser call everything is the session's tensor program; which batch
rows are the prompt's is worked out by comparing rows as tensors (``PromptRows.rows``), never on the host, so the call
compiles as one graph whether ``torch.compile`` is applied before or after ``apply_nlce``.
"""

from __future__ import annotations

import weakref

import torch

from ..errors import NlceError
from ..nlce import ConceptSet, NlceSession, build_concept_set, derive_nlce_config, make_nlce_config, neighbor_table
from ..nlce.config import OPERATOR_SETTINGS
from ..nlce.session import CARRY_TOKENS

_INSTALLED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # denoiser -> the handle installed on it
LAYOUT = "batch"  # diffusers runs every row of a step in one call: one carried gate per handle


class PromptRows:
    """What ``encode_prompt`` returned last (outside the denoiser): the prompt's rows (n, S, d), the negative prompt's
    rows (n, S, d) or None, and the prompt's word rows (n, S) bool or None (text unknown), on the encoding device."""

    def __init__(self):
        self.prompt = self.negative = self.words = None

    def remember(self, prompt: torch.Tensor, negative: torch.Tensor | None, words: torch.Tensor | None) -> None:
        self.prompt = prompt.detach()
        self.words = None if words is None else words.to(prompt.device)
        self.negative = None if negative is None or negative.shape != prompt.shape else negative.detach()

    def remember_negative(self, negative: torch.Tensor) -> None:
        """A negative prompt encoded by a call of its own (Flux's true CFG)."""
        self.negative = negative.detach()

    def rows(self, context: torch.Tensor):
        """(conditional (B,) bool, word rows (B, S) bool or None) of a batch of context rows, worked out as tensor
        arithmetic: ``[negative, prompt]`` (the pipelines' classifier-free-guidance layout) where the rows are exactly
        those; else row by row (a row equal to one of the prompt's is conditional, with its words). With no prompt seen
        (embeddings passed straight to the denoiser) every row is, its words inferred."""
        B, S = context.shape[:2]
        prompt, negative, words = self.prompt, self.negative, self.words
        if prompt is None:
            return torch.ones(B, dtype=torch.bool, device=context.device), None
        if prompt.shape[1:] != context.shape[1:]:
            return torch.zeros(B, dtype=torch.bool, device=context.device), None
        n = prompt.shape[0]
        prompt = prompt.to(context.dtype)
        same = (context[:, None] == prompt[None]).flatten(2).all(-1)  # (B, n): row b is the prompt's row j
        conditional = same.any(dim=-1)
        row_words = None if words is None else (same.to(torch.float32) @ words.to(torch.float32)) > 0
        if B == 2 * n and negative is not None:  # [negative, prompt]: by position (a negative row may equal a prompt row)
            layout = (context[:n] == negative.to(context.dtype)).all() & same[n:].diagonal().all()
            halves = torch.arange(B, device=context.device) >= n
            conditional = torch.where(layout, halves, conditional)
            if words is not None:
                row_words = torch.where(layout, torch.cat([torch.zeros_like(words), words]), row_words)
        return conditional, row_words


class NlceHandle:
    """What an adapter installed on a pipeline's denoiser; ``remove()`` restores the pipeline exactly."""

    def __init__(self, pipe, denoiser, concept_set: ConceptSet, session: NlceSession, gating_layer: str, family: str):
        self.pipe, self.denoiser, self.concept_set, self.session = pipe, denoiser, concept_set, session
        self.gating_layer, self.family = gating_layer, family
        self.original_processors = dict(denoiser.attn_processors)
        self.prompts = PromptRows()
        self._saved = {(o, n): o.__dict__.get(n) for o, n in self._wrapped()}
        self.removed = False

    @property
    def unet(self):  # the denoiser under the name the UNet adapter's users know
        return self.denoiser

    @property
    def diagnostics(self) -> list[dict]:
        """One dict per denoiser pass: run, step, timestep, dry, live tokens and active concepts per batch row, gate statistics."""
        return self.session.diagnostics

    def _wrapped(self) -> list:
        """(owner, attribute) of each attribute ``_install`` replaces."""
        return [(self.denoiser, "forward"), (self.pipe, "encode_prompt")]

    def _processors(self) -> dict:
        raise NotImplementedError

    def _forward(self, forward):
        raise NotImplementedError

    def _remember(self, result, prompt) -> None:
        raise NotImplementedError

    def _install(self) -> None:
        self.session.ready(self.denoiser.device, LAYOUT)
        self.denoiser.set_attn_processor({**self.original_processors, **self._processors()})
        self.denoiser.forward = self._forward(self.denoiser.forward)
        encode_prompt = getattr(self.pipe, "encode_prompt", None)
        if encode_prompt is not None:
            def nlce_encode_prompt(*args, **kwargs):
                result = encode_prompt(*args, **kwargs)
                self._remember(result, kwargs.get("prompt", args[0] if args else None))
                embeds = result[0]
                if torch.is_tensor(embeds):  # operators and the carried gate where the denoiser will run, before it runs
                    self.session.ready(embeds.device, LAYOUT, 2 * embeds.shape[0] * CARRY_TOKENS)
                return result

            self.pipe.encode_prompt = nlce_encode_prompt
        _INSTALLED[self.denoiser] = self

    def remove(self) -> None:
        """Put back the original processors and every attribute ``_install`` replaced."""
        if self.removed:
            return
        self.denoiser.set_attn_processor(dict(self.original_processors))
        for (owner, name), saved in self._saved.items():
            if saved is not None:
                setattr(owner, name, saved)
            else:
                owner.__dict__.pop(name, None)
        _INSTALLED.pop(self.denoiser, None)
        self.removed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def check_not_installed(denoiser) -> None:
    if denoiser in _INSTALLED:
        raise NlceError("NLCE is already applied to this pipeline; call remove() on its handle first")


def pipeline_operators(pipe, family: str, encode, concepts, neighbors, concept_set, preset, mine_top_k, settings):
    """(concept set, config) for ``apply_nlce`` on ``pipe``: operators built from ``concepts`` with ``encode`` (the
    pipeline's own row encoder), or ``concept_set`` checked (settings built into its operators cannot change; its
    family must match)."""
    if concept_set is None:
        config = make_nlce_config(preset, **settings)
        encoder = encode()
        concept_set = build_concept_set(encoder, concepts, neighbor_table(encoder, concepts, neighbors, mine_top_k), config)
    else:
        if concepts or neighbors:
            raise NlceError("pass either concepts (and neighbours) or a concept_set, not both")
        config = derive_nlce_config(concept_set.config, preset, **settings)
        changed = [k for k in OPERATOR_SETTINGS if getattr(config, k) != getattr(concept_set.config, k)]
        if changed:
            raise NlceError(f"{', '.join(changed)} are built into the concept set's operators; build a new concept set to change them")
    concept_set.check_family(family, "this pipeline")
    return concept_set, config
