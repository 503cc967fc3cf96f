"""One sampling session of NLCE: the passes of a denoiser, the gate carried from pass to pass, and what was seen.

A host adapter, per denoiser call, runs ``run_pass`` (``driver.py``), which opens a ``Pass`` (``begin``) for each
UNet / transformer forward; in the call it hands over the context rows once (``prepare``) and then, per
cross-attention layer, its q, k, v (``cross_attention``) or, per joint-attention block, its q, k, v (``joint_attention``).
Everything a pass does is the tensor program of ``stages.py``; the state that outlives a pass (the single-pass
schedule's gate of the previous pass and that pass's timestep) is in tensors updated in place, never in Python
values that change from step to step, so that a compiled denoiser neither breaks nor recompiles. Nothing here knows a
host.
"""

from __future__ import annotations

import math

import torch

from .config import NlceConfig
from .operators import ConceptSet
from .stages import Operators, Prepared, gate_map, joint_attend, joint_gate, joint_layout, joint_terms, layer_terms, attend, heads_of
from .stages import prepare as prepare_rows

MAX_DIAGNOSTICS = 10_000  # entries kept (the oldest go first)
CARRY_TOKENS = 16_384     # gate values kept per batch row before a carry grows (a 128 x 128 gate: Flux at 2048 px)


def compiling() -> bool:
    """True while torch.compile traces (diagnostics, which are Python bookkeeping, are left out then)."""
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None) or torch._dynamo.is_compiling
    return bool(check())


def halved(hw: tuple[int, int], times: int) -> tuple[int, int]:
    """(h, w) after ``times`` stride-2 downsamplings (odd sizes round up, as the UNets' padded convolutions do)."""
    h, w = hw
    for _ in range(times):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


def spatial_shape_for(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer with ``tokens`` positions in a UNet whose input latent is ``latent_hw``."""
    for level in range(8):
        h, w = halved(latent_hw, level)
        if h * w == tokens:
            return h, w
    side = math.isqrt(tokens)
    return (side, tokens // side) if side * side == tokens else (1, tokens)


class Carry:
    """The gate of the latest real pass of one batch layout (single-pass schedule) and that pass's timestep, in tensors
    on the device: a flat buffer with room for ``size`` values, read and written in place."""

    def __init__(self, size: int, device):
        self.buffer = torch.zeros(size, dtype=torch.float32, device=device)
        self.last_t = torch.full((), float("-inf"), dtype=torch.float32, device=device)
        mark = getattr(torch._dynamo, "mark_static_address", None)
        if mark is not None:  # updated in place at a fixed address: CUDA graphs (mode="reduce-overhead") can replay them
            mark(self.buffer)
            mark(self.last_t)

    def fits(self, size: int, device) -> bool:
        return self.buffer.numel() >= size and self.buffer.device == torch.device(device)


class Pass:
    """One denoiser call under NLCE (``NlceSession.begin`` makes it; a host adapter hands it to every layer)."""

    def __init__(self, t: torch.Tensor, dry: bool, window, gating_shape, batch: int):
        self.t, self.dry, self.window = t, dry, window  # window: 0-d bool, real pass inside the timestep window; None if dry
        self.gating_shape, self.batch = tuple(gating_shape), batch
        self.prepared: Prepared | None = None
        self.gate = None       # read at the gating layer of this pass (a dry pass: the faithful schedule's gate)
        self.given = None      # faithful schedule: the dry pass's gate, inside the window
        self.previous = None   # single-pass schedule: the previous pass's gate, where it carries over
        self.carry: Carry | None = None
        self.derived: dict = {}
        self.seen: dict | None = None  # this pass's diagnostics entry (eager only)
        self.host: dict = {}           # what the host adapter keeps for the pass (its layers' sizes, the current block)


class NlceSession:
    """NLCE over the passes of one denoiser (a UNet or a joint-attention transformer), for as long as it is installed."""

    def __init__(self, concept_set: ConceptSet, config: NlceConfig | None = None, record_maps: bool = False):
        self.concepts = concept_set
        self.config = config or concept_set.config
        self.record_maps = record_maps
        self._operators: dict[str, Operators] = {}
        self._carries: dict = {}
        self._seen: list[dict] = []
        self.current: Pass | None = None  # the pass a host's layers belong to (set by driver.run_pass)

    # -- before sampling -----------------------------------------------------------------------------------------

    def operators(self, device) -> Operators:
        key = str(torch.device(device))
        if key not in self._operators:
            self._operators[key] = Operators(self.concepts, self.config, device)
        return self._operators[key]

    def ready(self, device, key=None, size: int = 0) -> None:
        """Build the operators on ``device`` and room for ``size`` carried gate values of layout ``key`` now, outside any
        denoiser call: a compiled denoiser then finds them in place at its first call and never recompiles for them."""
        self.operators(device)
        if key is not None:
            self._carry(key, max(size, CARRY_TOKENS), device)

    def _carry(self, key, size: int, device) -> Carry:
        carry = self._carries.get(key)
        if carry is None or not carry.fits(size, device):
            carry = self._carries[key] = Carry(max(size, 0 if carry is None else carry.buffer.numel()), device)
        return carry

    # -- passes --------------------------------------------------------------------------------------------------

    def begin(self, timestep, *, key, batch: int, gating_shape, device, dry: bool = False, given=None) -> Pass:
        """Open the pass of one denoiser call. ``timestep``: on a 0..1000 scale (a tensor, or a number); ``key``: the
        batch layout (a single-pass gate carries only to a later pass of the same layout); ``gating_shape``: the gating
        layer's (h, w) in this call; ``given``: the faithful schedule's dry-pass gate for the real pass."""
        cfg = self.config
        t = torch.as_tensor(timestep, dtype=torch.float32).to(device).reshape(())
        window = None if dry else t <= cfg.t_max
        p = Pass(t, dry, window, gating_shape, batch)
        if not dry and (cfg.stage2 or cfg.stage3):
            if cfg.schedule == "faithful":
                p.given = None if given is None else given * window
            else:
                p.carry = self._carry(key, batch * p.gating_shape[0] * p.gating_shape[1], device)
                # a sampling run's timesteps go down: one that does not (a new run, or another call at this step, such
                # as Flux's true-CFG negative prompt) takes nothing over
                same_run = t < p.carry.last_t
                p.previous = self._carried(p) * (same_run & window)
                p.carry.last_t.copy_(t)
        if not compiling():
            self._open_entry(p)
        return p

    def _carried(self, p: Pass) -> torch.Tensor:
        n = p.batch * p.gating_shape[0] * p.gating_shape[1]
        return p.carry.buffer[:n].view(p.batch, 1, *p.gating_shape)

    def prepare(self, p: Pass, context: torch.Tensor, conditional: torch.Tensor, words: torch.Tensor | None) -> Prepared:
        """Stage 1 and the live tokens of pass ``p`` for its context rows (B, S, d); ``conditional`` (B,) bool marks the
        prompt's rows, ``words`` (B, S) bool the rows of its words (None: every row but the first)."""
        if p.prepared is None:
            window = None if p.dry or not self.config.stage1 else p.window
            p.prepared = prepare_rows(self.operators(context.device), context, conditional, words, window)
            if p.seen is not None:
                p.seen["live"] = p.prepared.live_by_concept
        return p.prepared

    def _gate_here(self, p: Pass, raw: torch.Tensor):
        """The gating layer of pass ``p`` read ``raw``: keep it (a dry pass: for the real pass; single-pass: for this pass's
        later layers and, where some row is the prompt's, for the next pass). The gate this layer applies, or None."""
        if p.dry:
            p.gate = raw
            self._record_gate(p, raw, "dry pass")
            return None
        p.gate = gate = raw * p.window
        flat = p.carry.buffer[: gate.numel()]
        flat.copy_(torch.where(p.prepared.conditional.any(), gate.flatten(), flat))  # a negative-only call keeps the prompt's
        self._record_gate(p, gate, "this pass")
        return gate

    def _reads_gate(self, p: Pass, is_gating_layer: bool) -> bool:
        return is_gating_layer and (p.dry or self.config.schedule == "single-pass")

    def _applied(self, p: Pass):
        """(the gate a layer that reads none applies, and its tag), or (None, None)."""
        if p.dry:
            return None, None
        if self.config.schedule == "faithful":
            self._record_gate(p, p.given, "dry pass")
            return p.given, "given"
        if p.gate is not None:
            return p.gate, "this"
        self._record_gate(p, p.previous, "previous pass")
        return p.previous, "previous"

    def _derive(self, p: Pass, key, make):
        if key not in p.derived:
            p.derived[key] = make()
        return p.derived[key]

    def _layer_gate(self, p: Pass, q, k, heads: int, spatial_shape, is_gating_layer: bool, scale, incoming_keys):
        """(gate, tag) of a UNet cross-attention layer: read here at the gating layer (from the keys as they came in,
        as the dry pass reads them), else the one this pass, the previous pass or the dry pass left."""
        if not self._reads_gate(p, is_gating_layer):
            return self._applied(p)
        keys = incoming_keys() if incoming_keys is not None and self.config.stage1 and not p.dry else k
        s = (q.shape[-1] // heads) ** -0.5 if scale is None else scale
        logits = (heads_of(q, heads).float() @ heads_of(keys, heads).float().transpose(-1, -2)) * s
        return self._gate_here(p, gate_map(logits, p.prepared, spatial_shape)), "this"

    def cross_attention(self, p: Pass, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, spatial_shape,
                        is_gating_layer: bool, scale: float | None = None, incoming_keys=None) -> torch.Tensor:
        """One UNet cross-attention layer's output before ``to_out`` (B, N, heads*dim), stages 2 and 3 applied.
        ``k``, ``v``: from the pass's stage-1 context; ``incoming_keys()`` (gating layer): the keys of the context as it
        came in, so that the gate is read as the faithful schedule's dry pass reads it."""
        cfg = self.config
        if not (cfg.stage2 or cfg.stage3):
            return attend(q, k, v, heads, {}, scale)
        gate, tag = self._layer_gate(p, q, k, heads, spatial_shape, is_gating_layer, scale, incoming_keys)
        if gate is None:
            return attend(q, k, v, heads, {}, scale)
        terms = self._derive(p, (tag, tuple(spatial_shape), q.dtype),
                             lambda: layer_terms(cfg, gate, spatial_shape, p.prepared, q.dtype))
        return attend(q, k, v, heads, terms, scale)

    def scrub(self, p: Pass, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, heads: int, spatial_shape,
              is_gating_layer: bool, scale: float | None = None, incoming_keys=None) -> torch.Tensor:
        """Stage 3 on a cross-attention output someone else computed (``out``: B, N, channels); the gate is read or taken
        exactly as ``cross_attention`` does. Stage 2 cannot act here."""
        cfg = self.config
        if not (cfg.stage2 or cfg.stage3):
            return out
        gate, tag = self._layer_gate(p, q, k, heads, spatial_shape, is_gating_layer, scale, incoming_keys)
        if gate is None or not cfg.stage3:
            return out
        keep = self._derive(p, ("keep", tag, tuple(spatial_shape), out.dtype),
                            lambda: layer_terms(cfg, gate, spatial_shape, p.prepared, out.dtype, stage2=False))
        return out * keep["keep"]

    def joint_attention(self, p: Pass, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: slice, spatial_shape,
                        is_gating_block: bool) -> torch.Tensor | None:
        """One joint-attention block (q, k, v: B, heads, tokens, dim; the text tokens at ``text``) with stages 2 and 3 on
        the image queries; None where the settings leave the block alone (the host runs its own attention)."""
        cfg = self.config
        reads = self._reads_gate(p, is_gating_block)
        if not (cfg.stage2 or cfg.stage3) or (p.dry and not reads):
            return None
        B, H, L, D = q.shape
        layout = self._derive(p, ("joint", text.start, text.stop, L, D, v.dtype),
                              lambda: joint_layout(p.prepared, text, L, D, v.dtype, q.device))
        if reads:
            gate, tag = self._gate_here(p, joint_gate(q, k, layout, text, spatial_shape)), "this"
            if gate is None:  # the dry pass: the block's own attention
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            gate, tag = self._applied(p)
        terms = self._derive(p, ("joint terms", tag, text.start, text.stop, L, v.dtype),
                             lambda: joint_terms(cfg, gate, layout, text, L, v.dtype))
        return joint_attend(q, k, v, text, layout, terms)

    # -- diagnostics (eager only: Python bookkeeping, never inside a compiled call) -------------------------------

    def _open_entry(self, p: Pass) -> None:
        p.seen = {"t": p.t, "dry": p.dry, "window": p.window, "live": None, "gate": None}
        self._seen.append(p.seen)
        if len(self._seen) > MAX_DIAGNOSTICS + 256:  # a long-lived host session stays small
            self._read(self._seen[: len(self._seen) - MAX_DIAGNOSTICS])
            del self._seen[: len(self._seen) - MAX_DIAGNOSTICS]

    def _record_gate(self, p: Pass, gate, source: str) -> None:
        """Keep the gate a pass applied, for the diagnostics (its statistics are worked out when they are read: no
        operator runs here)."""
        if p.seen is not None and gate is not None and (p.seen["gate"] is None or source == "this pass"):
            p.seen["gate"] = {"map": gate, "shape": list(gate.shape[-2:]), "source": source}

    def _read(self, entries: list[dict]) -> None:
        """Turn the tensors ``entries`` keep into plain values (one read per 256 passes at most)."""
        for e in entries:
            if "done" in e:
                continue
            e["timestep"] = float(e.pop("t"))
            window = e.pop("window")
            e["intervened"] = bool(window) if window is not None else False
            live = e.pop("live")
            if live is not None:
                live = live.cpu()
                e["live_tokens"] = [torch.nonzero(live[b].any(dim=0)).flatten().tolist() for b in range(live.shape[0])]
                e["active"] = [[c for i, c in enumerate(self.concepts.concepts) if live[b, i].any()] for b in range(live.shape[0])]
                if not live.any():  # the gate is 0 everywhere and changes nothing: no gate, as the reference says
                    e["gate"] = None
            else:
                e["live_tokens"] = e["active"] = None
            if not e["dry"] and not e["intervened"]:  # outside the timestep window a real pass applies no gate
                e["gate"] = None
            gate = e["gate"]
            if gate is not None:
                g = gate.pop("map").detach().float()[:, 0]
                rows = live.flatten(1).any(1).to(g.device) if live is not None else torch.ones(len(g), dtype=torch.bool)
                g_live = g[rows] if rows.any() else g
                gate["mean"], gate["max"] = float(g_live.mean()), float(g_live.amax())
                gate["area"] = float((g_live > self.config.gate_threshold).float().mean())
                if self.record_maps:
                    e["gate_map"] = g.cpu()
            e["done"] = True

    @property
    def diagnostics(self) -> list[dict]:
        """One dict per pass: pass, run, step, timestep, dry, intervened, live tokens and active concepts per batch row,
        gate statistics (and ``gate_map`` with ``record_maps``). Read from the device here, not while sampling. Passes
        run under ``torch.compile`` are not recorded."""
        self._read(self._seen)
        out, run, step, last = [], -1, 0, None
        for i, e in enumerate(self._seen):
            if last is None or e["timestep"] > last:  # the timestep went up: a new sampling run
                run, step = run + 1, 0
            last = e["timestep"]
            out.append({"pass": i, "run": run, "step": step, **{k: v for k, v in e.items() if k != "done"}})
            step += 0 if e["dry"] else 1  # a dry pass carries the step number of the real pass that follows it
        return out
