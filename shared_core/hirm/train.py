"""HiRM training: update the first block(s), supervise a representation in the last block.

The model passed in is trained in place and restored to its exact original weights before
``train_patch`` returns (or raises): callers never see a half-trained encoder.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..encoders import canonical_parameters, model_signature
from ..errors import Cancelled, HirmError, TrainingError
from ..patch import ErasurePatch, check_finite, make_metadata
from ..textenc import tokenize
from .config import RETAIN_BATCH, HirmConfig, make_config, preservation_weight, step_prompt_count
from .methods import misdirection_targets, supervised_output

ProgressFn = Callable[[int, int, "float | None"], None]  # (step, total, loss); loss None while the report is measured
# Modules of a CLIP layer that HiRM trains (weights and biases); layer norms stay frozen.
TRAINED_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def trained_parameter_names(config: HirmConfig, num_layers: int) -> list[str]:
    names, seen = [], {}
    for given in config.trainable_layers:
        if not -num_layers <= given < num_layers:
            raise HirmError(f"trainable layer {given} does not exist (the encoder has {num_layers} layers)")
        layer = given % num_layers
        if layer in seen:  # 0 and -3 on 3 layers: the same parameters twice would be stepped twice
            raise HirmError(f"trainable layers {seen[layer]} and {given} are the same layer of this {num_layers}-layer encoder; "
                            "give each layer once")
        seen[layer] = given
        for m in TRAINED_MODULES:
            names += [f"text_model.encoder.layers.{layer}.{m}.weight", f"text_model.encoder.layers.{layer}.{m}.bias"]
    return names


def _prompts(config: HirmConfig, concept: str) -> list[str]:
    return [t.replace("{}", concept) for t in config.templates] if config.templates else [concept]


def retain_prompts(config: HirmConfig, concepts: tuple[str, ...]) -> list[str]:
    """What the preservation term holds, in the order its batches take them: ``config.preserve`` as given, then the
    neighbours (``config.neighbors``) and the shipped retain prompts, minus any that holds a word of an erased concept
    (docs/hirm-lists.md). The user's own come first: a short training that never reaches the end of the list still
    holds them."""
    from importlib import resources
    import re

    core = __package__.rsplit(".", 1)[0]
    text = resources.files(core).joinpath("data/retain_prompts.txt").read_text(encoding="utf-8")
    shipped = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    words = {w for c in concepts for w in re.findall(r"[a-z]+", c.lower()) if len(w) > 2}
    kept = [p for p in list(config.neighbors) + shipped if not words & set(re.findall(r"[a-z]+", p.lower()))]
    return list(dict.fromkeys(list(config.preserve) + kept))


def train_deltas(model, tokenizer, config: HirmConfig, progress: ProgressFn | None = None,
                 should_cancel: Callable[[], bool] | None = None, concepts: tuple[str, ...] | None = None,
                 step_offset: int = 0, total_steps: int | None = None) -> dict[str, torch.Tensor]:
    """Train jointly on ``concepts`` (default: all of the config's) and return the fp32 deltas.

    Each step is one AdamW step on the gradient of the loss over its prompts, accumulated over batches of at most
    ``config.batch_prompts`` prompts, so memory does not grow with the list (one concept fits one batch: the authors'
    step exactly). A long list trains the next ``step_prompt_count`` prompts of a seeded shuffle at each step, so time
    does not grow with it either (every prompt is trained at least once). With a preservation weight
    (``preservation_weight``: several concepts), the loss also holds the last-layer representation of a rotating batch
    of ``RETAIN_BATCH`` retain prompts at the original encoder's (docs/hirm-lists.md).
    The model's weights are restored exactly before returning or raising.
    """
    concepts = concepts or config.concepts
    device = next(model.parameters()).device
    if next(model.parameters()).dtype != torch.float32:
        raise HirmError("HiRM trains in fp32: load the encoder with dtype=torch.float32")
    params = canonical_parameters(model)
    names = trained_parameter_names(config, model.config.num_hidden_layers)
    originals = {n: params[n].detach().clone() for n in names}
    prompts = [p for c in concepts for p in _prompts(config, c)]
    size = config.batch_prompts
    per_step = step_prompt_count(config, len(concepts), len(prompts))
    if per_step < len(prompts):  # windows of a shuffle: a step mixes the list's parts whatever its order
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(config.seed)).tolist()
        prompts = [prompts[i] for i in order]
    ids = tokenize(tokenizer, prompts, what="concept").to(device)
    # the method's targets, a batch at a time: one (1, tokens, width) that every prompt shares, or one per prompt (told
    # apart on a first batch of at least two prompts)
    first = max(size, 2)
    targets = misdirection_targets(model, tokenizer, config, ids[:first]).to(device)
    if targets.shape[0] != 1:
        targets = torch.cat([targets] + [misdirection_targets(model, tokenizer, config, ids[i:i + size]).to(device)
                                         for i in range(first, len(prompts), size)])
    weight = preservation_weight(config, len(concepts))
    retain, held_size = None, min(size, RETAIN_BATCH)
    if weight > 0:
        used = retain_prompts(config, concepts)[: config.steps * held_size]  # the steps' rotation reaches no further
        retain_ids = tokenize(tokenizer, used, what="preserve prompt").to(device)
        with torch.no_grad():
            held = torch.cat([supervised_output(model, retain_ids[i:i + size], config.supervision).float()
                              for i in range(0, len(retain_ids), size)])
        retain = (retain_ids, held, held.pow(2).mean())
    trainable = [params[n] for n in names]
    # foreach: the multi-tensor update, bit for bit the per-tensor loop's result (torch's CPU default), a
    # tenth of the step's time faster on CPU; fused would be faster still but rounds differently from the reference
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-8, foreach=True)
    torch.manual_seed(config.seed)
    total = total_steps or config.steps
    start_loss = None
    wanted = {id(p) for p in trainable}
    flags = [(p, p.requires_grad) for p in model.parameters()]  # a model as loaded (all True): only the block trains
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in wanted)
        with torch.enable_grad():
            for step in range(config.steps):
                optimizer.zero_grad(set_to_none=True)
                loss = torch.zeros((), device=device)
                window = (torch.arange(per_step, device=device) + step * per_step) % len(prompts)  # all: in list order
                for j in range(0, per_step, size):  # the mean over the step's prompts, a batch at a time
                    if should_cancel is not None and should_cancel():  # per batch: a long list's step takes a while
                        raise Cancelled("training cancelled; no patch was made and the encoder is unchanged")
                    rows = window[j:j + size]
                    h = supervised_output(model, ids[rows], config.supervision)
                    aim = targets if len(targets) == 1 else targets[rows]
                    part = torch.nn.functional.mse_loss(h.float(), aim.expand(h.shape))
                    if per_step > size:
                        part = part * (len(rows) / per_step)
                    if not torch.isfinite(part):
                        raise TrainingError(f"training diverged at step {step + 1} (loss is {part.item()}); lower the learning "
                                            "rate. Nothing was written")
                    part.backward()
                    loss = loss + part.detach()
                if retain is not None:
                    start_loss = float(loss) if start_loss is None else start_loss
                    retain_ids, held, scale = retain
                    pick = torch.arange(step * held_size, (step + 1) * held_size, device=device) % len(retain_ids)
                    drift = torch.nn.functional.mse_loss(supervised_output(model, retain_ids[pick], config.supervision).float(),
                                                         held[pick]) / scale
                    (weight * start_loss * drift).backward()  # a full relative drift costs ``weight`` x the first loss
                optimizer.step()
                if progress is not None:
                    progress(step_offset + step + 1, total, float(loss))
        deltas = {n: (params[n].detach() - originals[n]).float().cpu() for n in names}
        check_finite(deltas, "training")
        if not any(bool(d.any()) for d in deltas.values()):
            raise TrainingError(f"training changed no weight at all (learning rate {config.lr:g} is too small to move fp32 "
                                "weights); use a larger --lr (the presets use 5e-5 and 1e-4). Nothing was written")
        return deltas
    finally:
        with torch.no_grad():
            for n in names:
                params[n].grad = None
                params[n].data.copy_(originals[n])
            for p, flag in flags:
                p.requires_grad_(flag)


def _config_deltas(model, tokenizer, config: HirmConfig, progress, should_cancel, offset: int, total: int) -> dict[str, torch.Tensor]:
    """The deltas ``config`` asks for on one encoder: joint training, or per concept then averaged (``multi="average"``)."""
    if config.multi == "average" and len(config.concepts) > 1:
        per = [train_deltas(model, tokenizer, config, progress, should_cancel, (c,), offset + i * config.steps, total)
               for i, c in enumerate(config.concepts)]
        return {n: sum(d[n] for d in per) / len(per) for n in per[0]}
    return train_deltas(model, tokenizer, config, progress, should_cancel, step_offset=offset, total_steps=total)


def _steps(config: HirmConfig) -> int:
    return config.steps * (len(config.concepts) if config.multi == "average" else 1)


def train_patch(model, tokenizer, config: HirmConfig | None = None, *, progress: ProgressFn | None = None,
                should_cancel: Callable[[], bool] | None = None, report: bool = True,
                report_dtype: torch.dtype = torch.float16, **settings) -> ErasurePatch:
    """Train a HiRM erasure patch on a transformers ``CLIPTextModel`` (left unchanged).

    Either pass a ``HirmConfig`` or the settings of ``make_config`` (``concepts``, ``method``,
    ``preset``, ...). ``progress(step, total, loss)`` is called after every step, and then with
    ``loss=None`` while the text-level report is measured (its encoder batches count in ``total``);
    ``should_cancel()`` is polled before every step (return True, or raise, to stop).
    The text-level report is measured with the deltas rounded to ``report_dtype`` (the dtype
    the file will store), so it describes the file, not the fp32 training result.
    """
    return train_model_patch({"clip_l": (model, tokenizer)}, config, progress=progress, should_cancel=should_cancel,
                             report=report, report_dtype=report_dtype, **settings)


def train_model_patch(encoders, config: HirmConfig | None = None, *, progress: ProgressFn | None = None,
                      should_cancel: Callable[[], bool] | None = None, report: bool = True,
                      report_dtype: torch.dtype = torch.float16, **settings) -> ErasurePatch:
    """One HiRM patch for every text encoder of a model: ``encoders`` maps components to ``(CLIPTextModel, tokenizer)``
    or ``(model, tokenizer, pooled projection)`` (SDXL: ``clip_l`` and ``clip_g``). Each encoder is trained with the
    same settings on its own first block, supervised at its own last layer (SPEC section 1), and left unchanged.

    With one encoder this is ``train_patch``. With SDXL's two, the patch holds both parts (one base fingerprint
    each) and its text-level report is measured on what SDXL's UNet reads (``report.TextView``).
    """
    if config is None:
        config = make_config(settings.pop("concepts"), **settings)
    elif settings:
        raise HirmError(f"pass either a config or settings, not both ({', '.join(settings)})")
    encoders = dict(encoders)
    signatures = {c: model_signature(e[0]) for c, e in encoders.items()}
    start = time.perf_counter()
    steps = _steps(config) * len(encoders)
    extra = 0
    if report:
        from ..report import report_batches, report_prompt_count

        first = next(iter(encoders.values()))
        extra = report_batches(*report_prompt_count(first[1], list(config.concepts), list(config.neighbors), config.preset))
    deltas = {}
    for i, (component, (model, tokenizer, *_)) in enumerate(encoders.items()):
        deltas[component] = _config_deltas(model, tokenizer, config, progress, should_cancel, i * _steps(config), steps + extra)
    seconds = time.perf_counter() - start
    meta = dict(method=config.method, concepts=list(config.concepts), config=config.to_dict(), train_seconds=seconds)
    parts = {c: ErasurePatch(deltas[c], make_metadata(model=encoders[c][0], base_signature=signatures[c], **meta))
             for c in encoders}
    patch = ErasurePatch.combine(parts, parts[next(iter(parts))].metadata)
    if report:
        from ..report import TextView, view_report

        rounded = patch.with_deltas(lambda d: d.to(report_dtype))
        measured = None if progress is None else (lambda done, total: progress(steps + done, steps + extra, None))
        view = TextView({c: e for c, e in encoders.items()}) if len(encoders) > 1 else TextView.single(*encoders[next(iter(encoders))][:2])
        patch = patch.with_metadata(report=view_report(view, rounded, neighbors=list(config.neighbors) or None, progress=measured),
                                    report_seconds=round(time.perf_counter() - start - seconds, 3))
    return patch


def average_patches(patches: list[ErasurePatch]) -> ErasurePatch:
    """Delta averaging of separately trained patches (the paper's multi-concept recipe)."""
    if not patches:
        raise HirmError("no patches to average")
    first = patches[0]
    for p in patches[1:]:
        if p.deltas.keys() != first.deltas.keys() or p.metadata.get("base_fingerprint") != first.metadata.get("base_fingerprint"):
            raise HirmError("only patches trained on the same encoder and layers can be averaged")
    deltas = {n: sum(p.deltas[n].float() for p in patches) / len(patches) for n in first.deltas}
    meta = dict(first.metadata)
    meta["concepts"] = [c for p in patches for c in p.concepts]
    meta["method"] = "+".join(sorted({p.method for p in patches}))
    meta["config"] = dict(meta.get("config") or {}, multi="average", concepts=meta["concepts"])
    meta.pop("report", None)
    return ErasurePatch(deltas, meta)
