"""Per-sampling-run NLCE state: live tokens, the spatial gate, and the modified cross-attention.

Hosts call, per UNet forward: ``begin_pass(timestep)``; per cross-attention layer:
``prepare(context, cond, token_mask)`` (stage 1 + live tokens), project q/k/v themselves, then
``attend(q, k, v, heads, prepared, spatial_shape, is_gating_layer)`` (stages 2 and 3) and
their own output projection. Nothing here knows a host.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import NlceConfig
from .operators import ConceptSet


@dataclass
class PreparedContext:
    context: torch.Tensor          # rows for to_k / to_v (stage 1 applied when intervening)
    live: torch.Tensor             # (batch, seq) bool: live tokens of the active concepts
    live_by_concept: torch.Tensor  # (batch, concepts, seq) bool
    scores: torch.Tensor           # (batch, concepts, seq) ||P_F x_j||
    has_live: bool = False         # live.any(), read once per pass (no device sync per layer)
    live_rows: tuple = ()          # per batch row: has it a live token (read with has_live; () = work it out here)

    def __post_init__(self):
        if not self.live_rows:
            self.live_rows = tuple(bool(r) for r in self.live.any(dim=-1).tolist())


MAX_DIAGNOSTICS = 10_000  # entries kept (the oldest go first)


def infer_token_mask(context: torch.Tensor) -> torch.Tensor:
    """Fallback when a host cannot say which rows hold the prompt's words: every row but the first.

    The start row is the same for every prompt; end and padding rows cannot be told apart from
    words without the token ids, so they are scored too (hosts that know the ids pass them).
    """
    mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
    mask[:, 0] = False
    return mask


def spatial_shape_for(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer with ``tokens`` positions in a UNet whose input latent is ``latent_hw``."""
    h, w = latent_hw
    for _ in range(8):
        if h * w == tokens:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    side = math.isqrt(tokens)
    return (side, tokens // side) if side * side == tokens else (1, tokens)


def live_token_mask(scores: torch.Tensor, candidates: torch.Tensor, ratio: float, floor: float) -> torch.Tensor:
    """Live if score > max(ratio * max candidate score, floor) (strict, as the reference); only candidate rows can be live."""
    s = scores.masked_fill(~candidates, 0.0)
    top = s.amax(dim=-1, keepdim=True)
    return candidates & (s > torch.clamp(ratio * top, min=floor))


def _runs(flags) -> list[tuple[slice | None, bool]]:
    """Consecutive batch rows with the same flag, as (rows, flag): [False, True] -> [(0:1, False), (1:2, True)];
    rows None when one run is the whole batch."""
    runs, start = [], 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            runs.append((slice(start, i), bool(flags[start])))
            start = i
    return [(None, runs[0][1])] if len(runs) == 1 else runs


def _rows(t: torch.Tensor, rows: slice | None) -> torch.Tensor:
    return t if rows is None else t[rows]


def _additive(blocked: torch.Tensor, dtype) -> torch.Tensor:
    """The attention mask that takes the ``blocked`` logits out, additive (0 / -inf in ``dtype``), as SDPA would turn a
    boolean mask at every call: made once, shared by the layers or blocks that use it."""
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill_(blocked, float("-inf"))


def _by_rows(runs, plain, special) -> torch.Tensor:
    """``plain(rows)`` or ``special(rows)`` per run of batch rows, in one batch again. Rows that NLCE leaves alone (the
    unconditional half, a prompt without the concept) go through the host's plain kernel, so their output is bit for
    bit the host's: a masked or explicit attention gives other last bits (torch < 2.13 on CPU, CUDA's flash vs.
    memory-efficient kernels). Which rows those are is known on the host (no device synchronisation per layer)."""
    outs = [special(rows) if flag else plain(rows) for rows, flag in runs]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, n, heads*dh) -> (batch, heads, n, dh)."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


class NlceSession:
    """State of one sampling run (gates carry from pass to pass; a new run is detected when the timestep goes up)."""

    def __init__(self, concept_set: ConceptSet, config: NlceConfig | None = None, record_maps: bool = False):
        self.concepts = concept_set
        self.config = config or concept_set.config
        self.record_maps = record_maps
        self._diagnostics: list[dict] = []
        self._unread: list[dict] = []  # entries whose gate statistics are still on the device
        self.timestep = 0.0
        self.dry = False
        self._gate = None        # gate computed in the current pass (B, 1, h, w)
        self._prev_gate = None   # gate of the previous real pass (single-pass schedule)
        self._dry_gate = None    # gate of the latest dry pass (faithful schedule)
        self._last_t = None      # timestep of the latest pass
        self._run, self._step, self._passes = -1, 0, 0
        self._prepared: dict = {}
        self._last_prepared = None  # ((context, cond, token mask), (context version, stage 1 on), prepared, live on host)
        self._ops: dict = {}
        self._projectors: dict = {}
        # 4096-wide rows (Flux, SD3): scores and stage 1 through the bases, never a d x d matrix; SD1.x / SDXL keep the
        # reference's matrices bit for bit
        self._low_rank = getattr(concept_set, "family", None) in ("flux", "sd3")
        self._low_rank_bases: dict = {}
        self._derived: dict = {}  # per pass: what the layers of one resolution / the joint blocks take from a gate
        self._flags: dict = {}    # id(gate) -> (gate, per batch row: any value above the gate threshold)

    @property
    def diagnostics(self) -> list[dict]:
        """One dict per pass: run, step, timestep, dry, live tokens and active concepts per batch row, gate statistics.
        The statistics are read from the device here, not while sampling (no synchronisation per pass)."""
        self._read_gates()
        return self._diagnostics

    def _read_gates(self) -> None:
        for entry in self._unread:
            gate = entry["gate"]
            if gate is not None and "stats" in gate:
                gate["mean"], gate["max"], gate["area"] = gate.pop("stats").tolist()
        self._unread.clear()

    # -- passes --------------------------------------------------------------------------------

    def in_window(self, timestep: float) -> bool:
        return float(timestep) <= self.config.t_max

    @property
    def intervening(self) -> bool:
        return not self.dry and self.in_window(self.timestep)

    def begin_pass(self, timestep: float, dry: bool = False) -> None:
        """Call once per UNet forward before its first cross-attention (timestep on a 0..1000 scale)."""
        t = float(timestep)
        if not self.dry:  # the pass that ends now was a real one
            self._prev_gate = self._gate
        if self._last_t is None or t > self._last_t:  # timesteps went up: a new sampling run, no gate carries over
            self._prev_gate = self._dry_gate = None
            self._run, self._step = self._run + 1, 0
        if dry:
            self._dry_gate = None
        self._gate, self._last_t = None, t
        self.dry, self.timestep = dry, t
        self._prepared, self._derived = {}, {}
        kept = {id(g) for g in (self._prev_gate, self._dry_gate) if g is not None}
        self._flags = {k: v for k, v in self._flags.items() if k in kept}
        del self._diagnostics[: max(0, len(self._diagnostics) + 1 - MAX_DIAGNOSTICS)]  # a long-lived host session stays small
        self._passes += 1
        # a dry pass carries the step number of the real pass that follows it
        self._diagnostics.append({"pass": self._passes - 1, "run": self._run, "step": self._step, "timestep": t,
                                 "dry": dry, "intervened": self.intervening, "live_tokens": None, "active": None,
                                 "gate": None})
        if not dry:
            self._step += 1

    # -- stage 1 and live tokens ---------------------------------------------------------------

    def _operator(self, active: tuple[int, ...], device) -> torch.Tensor:
        key = (active, device)
        if key not in self._ops:
            cfg, cs = self.config, self.concepts
            m = torch.eye(cs.width, dtype=torch.float32, device=device)
            for i in active:  # P_multi = P_1 P_2 ... P_k
                m = m @ cs.modulation(i, cfg.beta, cfg.gamma).to(device)
            self._ops[key] = m.T.contiguous()  # rows: x' = x P_multi^T
        return self._ops[key]

    def warm(self, device) -> None:
        """Build what stage 1 and the live-token scores use on ``device`` now, so that the first sampling pass does
        not pay for it."""
        if self._low_rank:
            self._bases(device)
            return
        n = len(self.concepts.concepts)
        self._concept_projectors(device)
        for active in {tuple(range(n)), *((i,) for i in range(n))}:
            self._operator(active, device)

    def _bases(self, device) -> list:
        """Per concept (basis (d, r), weights (r,), neighbour basis and weights or None) on ``device``."""
        if device not in self._low_rank_bases:
            cs = self.concepts
            mv = lambda pair: None if pair is None else tuple(t.to(device, torch.float32) for t in pair)  # noqa: E731
            self._low_rank_bases[device] = [(*mv(cs.bases[i]), mv(cs.neighbor_bases[i])) for i in range(len(cs.concepts))]
        return self._low_rank_bases[device]

    def _low_rank_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S) ``||P_F x||`` through each concept's basis (d x r) instead of its d x d projector."""
        return torch.stack([((x @ b) * w).norm(dim=-1) for b, w, _ in self._bases(x.device)], dim=1)

    def _low_rank_stage1(self, x: torch.Tensor, active: tuple[int, ...]) -> torch.Tensor:
        """``x P_multi^T`` for rows ``x`` (S, d), each operator applied as ``x - beta y + gamma y P_N`` with
        ``y = x P_F`` through the bases (the last concept of ``active`` first, as the product says)."""
        cfg = self.config
        for i in reversed(active):
            b, w, neighbors = self._bases(x.device)[i]
            y = ((x @ b) * w) @ b.T
            x = x - cfg.beta * y
            if neighbors is not None and cfg.gamma:
                x = x + cfg.gamma * (((y @ neighbors[0]) * neighbors[1]) @ neighbors[0].T)
        return x

    def _concept_projectors(self, device) -> torch.Tensor:
        if device not in self._projectors:
            cs = self.concepts
            self._projectors[device] = torch.stack([cs.concept_projector(i) for i in range(len(cs.concepts))]).to(device)
        return self._projectors[device]

    def prepare(self, context: torch.Tensor, cond: torch.Tensor, token_mask: torch.Tensor | None = None) -> PreparedContext:
        """Stage-1 context and live tokens for one pass (cached: call it in every layer; a pass given the very tensors
        of the previous pass, unchanged, as diffusers' pipelines do at every step, reuses its work)."""
        key = (context.data_ptr(), tuple(context.shape), context.dtype, context.device)
        if key in self._prepared:
            return self._prepared[key]
        tensors = (context, cond, token_mask)  # the same objects, the context not changed in place since
        version = (None if context.is_inference() else context._version, self.config.stage1 and self.intervening)
        last = self._last_prepared
        if last is not None and version[0] is not None and version == last[1] and all(map(operator.is_, tensors, last[0])):
            prepared, live_host = last[2:]
        else:
            prepared, live_host = self._prepare(context, cond, token_mask)
            self._last_prepared = (tensors, version, prepared, live_host)
        self._prepared[key] = prepared
        entry = self._diagnostics[-1] if self._diagnostics else None
        if entry is not None and entry["live_tokens"] is None:
            active = live_host.any(dim=-1)  # (B, C)
            entry["live_tokens"] = [torch.nonzero(live_host[b].any(dim=0)).flatten().tolist() for b in range(len(active))]
            entry["active"] = [[c for i, c in enumerate(self.concepts.concepts) if active[b, i]] for b in range(len(active))]
        return prepared

    def _prepare(self, context: torch.Tensor, cond, token_mask: torch.Tensor | None):
        cfg, cs = self.config, self.concepts
        B = context.shape[0]
        cond = torch.as_tensor(cond, dtype=torch.bool, device=context.device).reshape(B)
        tokens = infer_token_mask(context) if token_mask is None else token_mask.to(context.device, torch.bool)
        x = context.float()
        if self._low_rank:
            scores = self._low_rank_scores(x)
        else:
            scores = torch.einsum("bsd,cde->bcse", x, self._concept_projectors(x.device)).norm(dim=-1)  # (B, C, S)
        candidates = (tokens & cond[:, None])[:, None, :].expand_as(scores)
        live = live_token_mask(scores, candidates, cfg.live_ratio, cfg.live_floor * cs.live_floor_scale)
        live_host = live.cpu()  # the one read from the device in a pass: which rows and concepts are live
        active = live_host.any(dim=-1)  # (B, C)
        out = context
        if cfg.stage1 and self.intervening:
            # each row: the product of its active concepts' operators; no active concept: all of them (stage 1 is global)
            rows = []
            for b in range(B):
                idx = tuple(int(i) for i in torch.nonzero(active[b]).flatten()) or tuple(range(len(cs.concepts)))
                rows.append(self._low_rank_stage1(x[b], idx) if self._low_rank else x[b] @ self._operator(idx, x.device))
            out = torch.stack(rows).to(context.dtype)
        rows = tuple(bool(r) for r in active.any(dim=1).tolist())
        return PreparedContext(out, live.any(dim=1), live, scores, any(rows), rows), live_host

    # -- stages 2 and 3 ------------------------------------------------------------------------

    def _gate_to_use(self, batch: int):
        g = self._dry_gate if self.config.schedule == "faithful" else (self._gate if self._gate is not None else self._prev_gate)
        return g if g is not None and g.shape[0] == batch else None

    def _carried_source(self) -> str:
        """Where the gate a layer uses without reading one came from (diagnostics)."""
        if self.config.schedule == "faithful":
            return "dry pass"
        return "this pass" if self._gate is not None else "previous pass"

    def _gate_map(self, probs: torch.Tensor, prepared: PreparedContext, spatial_shape) -> torch.Tensor:
        """(B, 1, h, w): per concept the head-averaged probability given to its live tokens, mean over them; max over concepts."""
        mean_probs = probs.mean(dim=1)  # (B, N, S)
        lbc = prepared.live_by_concept.to(mean_probs.dtype)  # (B, C, S)
        per_concept = torch.einsum("bns,bcs->bcn", mean_probs, lbc) / lbc.sum(-1, keepdim=True).clamp(min=1)
        return per_concept.amax(dim=1).reshape(probs.shape[0], 1, *spatial_shape)

    def _record_gate(self, gate: torch.Tensor, prepared: PreparedContext, source: str, overwrite: bool) -> None:
        entry = self._diagnostics[-1] if self._diagnostics else None
        if entry is None or (entry["gate"] is not None and not overwrite):
            return
        live = [rows for rows, flag in _runs(prepared.live_rows) if flag]
        g = (torch.cat([_rows(gate, rows) for rows in live]) if live else gate).detach().float()
        stats = torch.stack([g.mean(), g.amax(), (g > self.config.gate_threshold).float().mean()])  # read when asked
        entry["gate"] = {"stats": stats, "shape": list(gate.shape[-2:]), "source": source}
        self._unread.append(entry)
        if len(self._unread) > 256:  # a long run without anyone reading: one read per 256 passes
            self._read_gates()
        if self.record_maps:
            entry["gate_map"] = gate[:, 0].detach().float().cpu()

    def _above(self, gate: torch.Tensor) -> tuple:
        """Per batch row: has ``gate`` a value above the gate threshold (read from the device once per gate)."""
        if id(gate) not in self._flags:
            flags = (gate.flatten(1) > self.config.gate_threshold).any(dim=1).tolist()
            self._flags[id(gate)] = (gate, tuple(bool(f) for f in flags))
        return self._flags[id(gate)][1]

    def _gate_source(self, qh: torch.Tensor, kh: torch.Tensor, heads: int, prepared: PreparedContext, spatial_shape,
                     is_gating_layer: bool, scale: float, gate_key: torch.Tensor | None):
        """(the gate this layer applies (B, 1, h, w) or None, fp32 logits of this layer's own keys or None); reads a
        new gate at the gating layer."""
        cfg = self.config
        if not (prepared.has_live and (cfg.stage2 or cfg.stage3)):
            return None, None
        if is_gating_layer and (self.dry or (self.intervening and cfg.schedule == "single-pass")):
            own = gate_key is None
            gate_logits = (qh.float() @ (kh if own else _heads(gate_key, heads)).float().transpose(-1, -2)) * scale
            new_gate = self._gate_map(gate_logits.softmax(dim=-1), prepared, spatial_shape)
            self._record_gate(new_gate, prepared, "dry pass" if self.dry else "this pass", overwrite=True)
            if self.dry:
                self._dry_gate = new_gate
                return None, None
            self._gate = new_gate
            return new_gate, gate_logits if own else None
        gate = self._gate_to_use(qh.shape[0]) if self.intervening else None
        if gate is not None:
            self._record_gate(gate, prepared, self._carried_source(), overwrite=False)
        return gate, None

    def _layer_terms(self, gate: torch.Tensor, spatial_shape, prepared: PreparedContext, dtype) -> dict:
        """What every cross-attention layer at one resolution takes from ``gate``, made once per pass and resolution:
        ``runs`` (the batch rows stage 2 changes), ``mask`` or ``factor`` (scale) of stage 2 and ``keep`` (the
        output's factor) of stage 3."""
        key = (id(gate), tuple(spatial_shape), id(prepared), dtype)
        if key in self._derived:
            return self._derived[key]
        cfg, B = self.config, gate.shape[0]
        g = gate.float()
        if tuple(gate.shape[-2:]) != tuple(spatial_shape):
            g = F.interpolate(g, size=spatial_shape, mode="bilinear", align_corners=False)
        g = g.reshape(B, -1)  # (B, N)
        live = prepared.live[:, None, :]  # (B, 1, S)
        terms = {"gate": gate, "runs": [(None, False)]}
        if cfg.stage2 and cfg.suppression == "mask":  # live logits -> -inf where the gate is high; softmax renormalises
            # a gate with nothing above the threshold at its own resolution has nothing above it at any (bilinear)
            changed = [a and b for a, b in zip(prepared.live_rows, self._above(gate))]
            if any(changed):
                terms["runs"] = _runs(changed)
                terms["mask"] = _additive(((g > cfg.gate_threshold)[:, :, None] & live)[:, None], dtype)  # (B, 1, N, S)
        elif cfg.stage2:  # scale: probabilities of live tokens times (1 - G), not renormalised
            terms["runs"] = _runs(prepared.live_rows)
            terms["factor"] = torch.where(live, 1.0 - g[:, :, None], torch.ones((), device=g.device))[:, None]
        if cfg.stage3:
            keep = (1.0 - g) if cfg.scrub == "soft" else (g <= cfg.scrub_threshold).to(torch.float32)
            terms["keep"] = keep[:, :, None].to(dtype)
        self._derived[key] = terms
        return terms

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, prepared: PreparedContext,
               spatial_shape: tuple[int, int], is_gating_layer: bool, scale: float | None = None,
               gate_key: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-attention output before ``to_out``: (batch, h*w, heads*dim) with stages 2 and 3.

        ``gate_key`` (optional, gating layer only): keys projected from the context as it came in,
        before stage 1. The gate is then read from the same keys as the faithful schedule's dry
        pass; without it the gate is read from ``k`` (the stage-1 keys).
        """
        B, N, C = q.shape
        qh, kh, vh = _heads(q, heads), _heads(k, heads), _heads(v, heads)
        sdpa_scale = scale  # None: SDPA's own default, exactly as the hosts' plain attention
        scale = qh.shape[-1] ** -0.5 if scale is None else scale
        gate, logits = self._gate_source(qh, kh, heads, prepared, spatial_shape, is_gating_layer, scale, gate_key)

        def plain(rows=None):
            return F.scaled_dot_product_attention(_rows(qh, rows), _rows(kh, rows), _rows(vh, rows), scale=sdpa_scale)

        if gate is None:
            return plain().transpose(1, 2).reshape(B, N, C)
        terms = self._layer_terms(gate, spatial_shape, prepared, q.dtype)
        if "mask" in terms:
            def masked(rows):
                return F.scaled_dot_product_attention(_rows(qh, rows), _rows(kh, rows), _rows(vh, rows),
                                                      attn_mask=_rows(terms["mask"], rows), scale=sdpa_scale)
            out = _by_rows(terms["runs"], plain, masked)
        elif "factor" in terms:
            def scaled(rows):
                lg = _rows(logits, rows) if logits is not None else \
                    (_rows(qh, rows).float() @ _rows(kh, rows).float().transpose(-1, -2)) * scale
                return (lg.softmax(-1) * _rows(terms["factor"], rows)).to(vh.dtype) @ _rows(vh, rows)
            out = _by_rows(terms["runs"], plain, scaled)
        else:
            out = plain()
        out = out.transpose(1, 2).reshape(B, N, C)
        return out * terms["keep"].to(out.dtype) if "keep" in terms else out

    # -- joint attention (Flux, SD3; docs/nlce-joint-attention.md) --------------------------------------

    def joint_acts(self, prepared: PreparedContext, is_gating_block: bool, batch: int) -> bool:
        """Whether ``joint_attend`` changes anything in this block (else a host runs its own attention)."""
        cfg = self.config
        if not (prepared.has_live and (cfg.stage2 or cfg.stage3)):
            return False
        if is_gating_block and (self.dry or (self.intervening and cfg.schedule == "single-pass")):
            return True
        return self.intervening and self._gate_to_use(batch) is not None

    def joint_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: slice, prepared: PreparedContext,
                     spatial_shape: tuple[int, int], is_gating_block: bool) -> torch.Tensor | None:
        """One joint-attention block (q, k, v: batch, heads, tokens, dim; the text tokens at ``text``, at the start or
        the end): stages 2 and 3 on the image queries. Returns the attention output (batch, heads, tokens, dim), or None
        when this block has nothing to change (the host then runs its own attention, unchanged).

        What NLCE needs besides the output comes out of the block's own softmax without materialising it: attention
        calls of the image queries over the same keys with other values, each at the head size the fast kernels need
        (a wider value would leave them): the live keys' values (their share of each query's output) and, at the
        gating block, indicators (1 on every text key; 1 on each concept's live keys). The gate is the softmax
        restricted to the text keys, as a UNet's cross-attention has it: a concept's live share / the text share, mean
        over its live keys and the heads, max over concepts. Stages 2 ('scale') and 3 remove the live keys' share of an
        image query's output; text queries are never changed.
        """
        cfg = self.config
        if not self.joint_acts(prepared, is_gating_block, q.shape[0]):
            return None
        gate_here = is_gating_block and (self.dry or (self.intervening and cfg.schedule == "single-pass"))
        B, H, L, D = q.shape
        image = slice(text.stop, L) if text.start == 0 else slice(0, text.start)
        lay = self._joint_layout(prepared, text, L, D, v.dtype, q.device)
        if gate_here:
            marks = [F.scaled_dot_product_attention(q[:, :, image], k, m.expand(B, H, L, D)) for m in lay["marks"]]
            shares = torch.cat(marks, dim=-1)[..., : 1 + lay["concepts"]].float()
            within_text = shares[..., 1:] / shares[..., :1].clamp(min=torch.finfo(torch.float32).tiny)
            per_concept = within_text.mean(dim=1) / lay["count"]  # (B, image tokens, C)
            gate = per_concept.amax(dim=-1).reshape(B, 1, *spatial_shape)
            self._record_gate(gate, prepared, "dry pass" if self.dry else "this pass", overwrite=True)
            if self.dry:
                self._dry_gate = gate
                return F.scaled_dot_product_attention(q, k, v)
            self._gate = gate
        else:
            gate = self._gate_to_use(B)
            self._record_gate(gate, prepared, self._carried_source(), overwrite=False)
        terms = self._joint_terms(gate, lay, prepared, image, L, v.dtype)
        mask = terms["mask"]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if terms["coef"] is not None:  # the live keys' share of the image queries' outputs, taken off
            share = F.scaled_dot_product_attention(q[:, :, image], k, v * lay["live"],
                                                   attn_mask=None if mask is None else mask[:, :, image])
            o[:, :, image].addcmul_(terms["coef"], share, value=-1)
        return o

    def _joint_layout(self, prepared: PreparedContext, text: slice, L: int, D: int, dtype, device) -> dict:
        """Per pass and layout (every block of a pass shares it): the live keys, each concept's live-key count, and the
        indicator value sets the gating block attends over (1 + concepts channels, padded to the head size)."""
        key = ("joint", id(prepared), text.start, text.stop, L, D, dtype, device)
        if key in self._derived:
            return self._derived[key]
        B, C, _ = prepared.live_by_concept.shape
        by_concept = torch.zeros(B, C, L, dtype=torch.bool, device=device)
        by_concept[:, :, text] = prepared.live_by_concept.to(device)[:, :, : text.stop - text.start]
        live = by_concept.any(dim=1)  # (B, L)
        marks = torch.zeros(B, L, D * -(-(1 + C) // D), dtype=dtype, device=device)  # 1 + C channels, padded
        marks[:, text, 0] = 1
        marks[:, :, 1: 1 + C] = by_concept.transpose(1, 2).to(dtype)
        layout = {"concepts": C, "live_keys": live, "live": live[:, None, :, None].to(dtype),
                  "count": by_concept.sum(-1)[:, None, :].clamp(min=1),
                  "marks": [marks[:, None, :, i: i + D] for i in range(0, marks.shape[-1], D)]}
        self._derived[key] = layout
        return layout

    def _joint_terms(self, gate: torch.Tensor, lay: dict, prepared: PreparedContext, image: slice, L: int, dtype) -> dict:
        """What every block of a pass takes from ``gate``: stage 2's mask over (query, key) or None, and the factor
        ``coef`` (B, 1, image tokens, 1) of the live keys' share taken off an image query's output (stage 2 'scale',
        stage 3), or None."""
        key = ("joint terms", id(gate), id(lay), dtype)
        if key in self._derived:
            return self._derived[key]
        cfg, B = self.config, gate.shape[0]
        g = gate.reshape(B, -1).to(torch.float32)  # (B, image tokens)
        mask = None
        if cfg.stage2 and cfg.suppression == "mask" and any(a and b for a, b in zip(prepared.live_rows, self._above(gate))):
            mask = torch.zeros(B, 1, L, L, dtype=dtype, device=g.device)  # text queries: nothing blocked
            mask[:, 0, image] = _additive((g > cfg.gate_threshold)[:, :, None] & lay["live_keys"][:, None, :], dtype)
        gi = g[:, None, :, None]
        coef = None
        if cfg.stage2 and cfg.suppression == "scale":  # their probabilities times (1 - G), not renormalised
            coef = gi
        if cfg.stage3:
            keep = gi if cfg.scrub == "soft" else (gi > cfg.scrub_threshold).to(torch.float32)
            coef = keep if coef is None else coef + keep * (1 - gi)  # scrub what scaling left
        terms = {"gate": gate, "mask": mask, "coef": None if coef is None else coef.to(dtype)}
        self._derived[key] = terms
        return terms

    def scrub(self, out: torch.Tensor, prepared: PreparedContext, spatial_shape: tuple[int, int], is_gating_layer: bool, *,
              q: torch.Tensor, k: torch.Tensor, heads: int, scale: float | None = None,
              gate_key: torch.Tensor | None = None) -> torch.Tensor:
        """Stage 3 on an attention output that someone else computed (``out``: batch, h*w, channels); the gate
        is read or computed from ``q`` and ``k`` exactly as ``attend`` does. Stage 2 cannot act here."""
        qh, kh = _heads(q, heads), _heads(k, heads)
        scale = qh.shape[-1] ** -0.5 if scale is None else scale
        gate, _ = self._gate_source(qh, kh, heads, prepared, spatial_shape, is_gating_layer, scale, gate_key)
        if gate is None or not self.config.stage3:
            return out
        return out * self._layer_terms(gate, spatial_shape, prepared, out.dtype)["keep"]
