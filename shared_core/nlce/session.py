"""Per-sampling-run NLCE state: live tokens, the spatial gate, and the modified cross-attention.

Hosts call, per UNet forward: ``begin_pass(timestep)``; per cross-attention layer:
``prepare(context, cond, token_mask)`` (stage 1 + live tokens), project q/k/v themselves, then
``attend(q, k, v, heads, prepared, spatial_shape, is_gating_layer)`` (stages 2 and 3) and
their own output projection. Nothing here knows a host.
"""

from __future__ import annotations

import math
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


def _masked_attention(qh, kh, vh, blocked, scale):
    """SDPA with ``blocked`` (B, N, S) logits masked out. Rows with nothing blocked (the unconditional half, a
    prompt without the concept) go through the plain kernel, so their output is bit for bit the host's: a
    masked kernel gives other last bits (torch < 2.13 on CPU, and CUDA's flash vs. memory-efficient kernels)."""
    rows = blocked.flatten(1).any(1)
    if not bool(rows.any()):
        return F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    if bool(rows.all()):
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=~blocked[:, None], scale=scale)
    out = qh.new_empty(*qh.shape[:-1], vh.shape[-1])
    out[~rows] = F.scaled_dot_product_attention(qh[~rows], kh[~rows], vh[~rows], scale=scale)
    out[rows] = F.scaled_dot_product_attention(qh[rows], kh[rows], vh[rows], attn_mask=~blocked[rows][:, None], scale=scale)
    return out


def _attend_sets(q: torch.Tensor, k: torch.Tensor, values: list[torch.Tensor], mask=None) -> list[torch.Tensor]:
    """Attention of ``q`` over ``k`` for several value sets (each batch, heads, keys, dim) in ONE call: the sets ride
    along as extra heads, so each keeps the head size the fast kernels need (a wider value would leave them)."""
    if len(values) == 1:
        return [F.scaled_dot_product_attention(q, k, values[0], attn_mask=mask)]
    n, H = len(values), q.shape[1]
    out = F.scaled_dot_product_attention(q.repeat(1, n, 1, 1), k.repeat(1, n, 1, 1), torch.cat(values, dim=1), attn_mask=mask)
    return list(out.split(H, dim=1))


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, n, heads*dh) -> (batch, heads, n, dh)."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


class NlceSession:
    """State of one sampling run (gates carry from pass to pass; a new run is detected when the timestep goes up)."""

    def __init__(self, concept_set: ConceptSet, config: NlceConfig | None = None, record_maps: bool = False):
        self.concepts = concept_set
        self.config = config or concept_set.config
        self.record_maps = record_maps
        self.diagnostics: list[dict] = []
        self.timestep = 0.0
        self.dry = False
        self._gate = None        # gate computed in the current pass (B, 1, h, w)
        self._prev_gate = None   # gate of the previous real pass (single-pass schedule)
        self._dry_gate = None    # gate of the latest dry pass (faithful schedule)
        self._last_t = None      # timestep of the latest pass
        self._run, self._step, self._passes = -1, 0, 0
        self._prepared: dict = {}
        self._ops: dict = {}
        self._projectors: dict = {}
        # 4096-wide rows (Flux, SD3): scores and stage 1 through the bases, never a d x d matrix; SD1.x / SDXL keep the
        # reference's matrices bit for bit
        self._low_rank = getattr(concept_set, "family", None) in ("flux", "sd3")
        self._low_rank_bases: dict = {}

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
        self._prepared = {}
        del self.diagnostics[: max(0, len(self.diagnostics) + 1 - MAX_DIAGNOSTICS)]  # a long-lived host session stays small
        self._passes += 1
        # a dry pass carries the step number of the real pass that follows it
        self.diagnostics.append({"pass": self._passes - 1, "run": self._run, "step": self._step, "timestep": t,
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
        """Stage-1 context and live tokens for one pass (cached: call it in every layer)."""
        key = (context.data_ptr(), tuple(context.shape), context.dtype, context.device)
        if key in self._prepared:
            return self._prepared[key]
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
        active = live.any(dim=-1).cpu()  # (B, C)
        out = context
        if cfg.stage1 and self.intervening:
            # each row: the product of its active concepts' operators; no active concept: all of them (stage 1 is global)
            rows = []
            for b in range(B):
                idx = tuple(int(i) for i in torch.nonzero(active[b]).flatten()) or tuple(range(len(cs.concepts)))
                rows.append(self._low_rank_stage1(x[b], idx) if self._low_rank else x[b] @ self._operator(idx, x.device))
            out = torch.stack(rows).to(context.dtype)
        prepared = PreparedContext(out, live.any(dim=1), live, scores, bool(active.any()))
        self._prepared[key] = prepared
        entry = self.diagnostics[-1] if self.diagnostics else None
        if entry is not None and entry["live_tokens"] is None:
            entry["live_tokens"] = [torch.nonzero(prepared.live[b]).flatten().tolist() for b in range(B)]
            entry["active"] = [[c for i, c in enumerate(cs.concepts) if active[b, i]] for b in range(B)]
        return prepared

    # -- stages 2 and 3 ------------------------------------------------------------------------

    def _gate_to_use(self, batch: int):
        g = self._dry_gate if self.config.schedule == "faithful" else (self._gate if self._gate is not None else self._prev_gate)
        return g if g is not None and g.shape[0] == batch else None

    def _gate_map(self, probs: torch.Tensor, prepared: PreparedContext, spatial_shape) -> torch.Tensor:
        """(B, 1, h, w): per concept the head-averaged probability given to its live tokens, mean over them; max over concepts."""
        mean_probs = probs.mean(dim=1)  # (B, N, S)
        lbc = prepared.live_by_concept.to(mean_probs.dtype)  # (B, C, S)
        per_concept = torch.einsum("bns,bcs->bcn", mean_probs, lbc) / lbc.sum(-1, keepdim=True).clamp(min=1)
        return per_concept.amax(dim=1).reshape(probs.shape[0], 1, *spatial_shape)

    def _record_gate(self, gate: torch.Tensor, prepared: PreparedContext, source: str, overwrite: bool) -> None:
        entry = self.diagnostics[-1] if self.diagnostics else None
        if entry is None or (entry["gate"] is not None and not overwrite):
            return
        rows = prepared.live.any(dim=-1)
        g = (gate[rows] if rows.any() else gate).detach()
        entry["gate"] = {"mean": float(g.mean()), "max": float(g.max()), "area": float((g > self.config.gate_threshold).float().mean()),
                         "shape": list(gate.shape[-2:]), "source": source}
        if self.record_maps:
            entry["gate_map"] = gate[:, 0].detach().float().cpu()

    def _gate_for(self, qh: torch.Tensor, kh: torch.Tensor, heads: int, prepared: PreparedContext, spatial_shape,
              is_gating_layer: bool, scale: float, gate_key: torch.Tensor | None):
        """(gate (B, N) fp32 at this layer's resolution or None, fp32 logits of this layer's own keys or None)."""
        cfg = self.config
        logits = gate = None
        if not (prepared.has_live and (cfg.stage2 or cfg.stage3)):
            return None, None
        if is_gating_layer and (self.dry or (self.intervening and cfg.schedule == "single-pass")):
            own = gate_key is None
            gate_logits = (qh.float() @ (kh if own else _heads(gate_key, heads)).float().transpose(-1, -2)) * scale
            logits = gate_logits if own else None
            new_gate = self._gate_map(gate_logits.softmax(dim=-1), prepared, spatial_shape)
            self._record_gate(new_gate, prepared, "dry pass" if self.dry else "this pass", overwrite=True)
            if self.dry:
                self._dry_gate = new_gate
            else:
                self._gate = gate = new_gate
        elif self.intervening:
            gate = self._gate_to_use(qh.shape[0])
            if gate is not None:
                source = "dry pass" if cfg.schedule == "faithful" else ("this pass" if self._gate is not None else "previous pass")
                self._record_gate(gate, prepared, source, overwrite=False)
        if gate is None:
            return None, logits
        if tuple(gate.shape[-2:]) != tuple(spatial_shape):
            gate = F.interpolate(gate.float(), size=spatial_shape, mode="bilinear", align_corners=False)
        return gate.reshape(qh.shape[0], -1).to(torch.float32), logits

    def _scrubbed(self, out: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        if g is None or not cfg.stage3:
            return out
        keep = (1.0 - g) if cfg.scrub == "soft" else (g <= cfg.scrub_threshold).to(torch.float32)
        return out * keep[:, :, None].to(out.dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, prepared: PreparedContext,
               spatial_shape: tuple[int, int], is_gating_layer: bool, scale: float | None = None,
               gate_key: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-attention output before ``to_out``: (batch, h*w, heads*dim) with stages 2 and 3.

        ``gate_key`` (optional, gating layer only): keys projected from the context as it came in,
        before stage 1. The gate is then read from the same keys as the faithful schedule's dry
        pass; without it the gate is read from ``k`` (the stage-1 keys).
        """
        cfg = self.config
        B, N, C = q.shape
        qh, kh, vh = _heads(q, heads), _heads(k, heads), _heads(v, heads)
        sdpa_scale = scale  # None: SDPA's own default, exactly as the hosts' plain attention
        scale = qh.shape[-1] ** -0.5 if scale is None else scale
        g, logits = self._gate_for(qh, kh, heads, prepared, spatial_shape, is_gating_layer, scale, gate_key)
        blocked = factor = None
        if g is not None:
            live = prepared.live[:, None, :]  # (B, 1, S)
            if cfg.stage2 and cfg.suppression == "mask":  # live logits -> -inf where the gate is high; softmax renormalises
                blocked = (g > cfg.gate_threshold)[:, :, None] & live  # (B, N, S)
            elif cfg.stage2:  # scale: probabilities of live tokens times (1 - G), not renormalised
                factor = torch.where(live, 1.0 - g[:, :, None], torch.ones((), device=g.device))  # (B, N, S)
                if logits is None:
                    logits = (qh.float() @ kh.float().transpose(-1, -2)) * scale
        if blocked is None and factor is None:
            out = F.scaled_dot_product_attention(qh, kh, vh, scale=sdpa_scale)
        elif logits is None:
            out = _masked_attention(qh, kh, vh, blocked, sdpa_scale)
        else:
            if blocked is not None:
                logits = logits.masked_fill(blocked[:, None], float("-inf"))
            probs = logits.softmax(-1)
            if factor is not None:
                probs = probs * factor[:, None]
            out = probs.to(vh.dtype) @ vh
        return self._scrubbed(out.transpose(1, 2).reshape(B, N, C), g)

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
        """One joint-attention block (q, k, v: batch, heads, tokens, dim; the text tokens at ``text``): stages 2 and 3
        on the image queries. Returns the attention output (batch, heads, tokens, dim), or None when this block has
        nothing to change (the host then runs its own attention, unchanged).

        What NLCE needs besides the output comes out of the block's own softmax without materialising it: further
        value sets ride along the same attention call as extra heads (``_attend_sets``): the live keys' values (their
        share of each query's output) and, at the gating block, indicators (1 on every text key; 1 on each concept's
        live keys). The gate is the softmax restricted to the text keys, as a UNet's cross-attention has it: a
        concept's live share / the text share, mean over its live keys and the heads, max over concepts. Stages 2
        ('scale') and 3 remove the live keys' share of an image query's output; text queries are never changed.
        """
        cfg = self.config
        if not self.joint_acts(prepared, is_gating_block, q.shape[0]):
            return None
        gate_here = is_gating_block and (self.dry or (self.intervening and cfg.schedule == "single-pass"))
        B, H, L, D = q.shape
        T = text.stop - text.start
        by_concept = torch.zeros(B, prepared.live_by_concept.shape[1], L, dtype=torch.bool, device=q.device)
        by_concept[:, :, text] = prepared.live_by_concept.to(q.device)[:, :, :T]
        live = by_concept.any(dim=1)  # (B, L)
        image = torch.ones(L, dtype=torch.bool, device=q.device)
        image[text] = False
        if gate_here:
            C = by_concept.shape[1]
            marks = torch.zeros(B, L, D * -(-(1 + C) // D), dtype=v.dtype, device=v.device)  # 1 + C channels, padded
            marks[:, :, 0] = (~image).to(v.dtype)
            marks[:, :, 1: 1 + C] = by_concept.transpose(1, 2).to(v.dtype)
            sets = [marks[:, None, :, i: i + D].expand(B, H, L, D) for i in range(0, marks.shape[-1], D)]
            outs = _attend_sets(q, k, ([v] if self.dry else []) + sets)
            shares = torch.cat(outs[1:] if self.dry else outs, dim=-1)[..., : 1 + C].float()[:, :, image]
            within_text = shares[..., 1:] / shares[..., :1].clamp(min=torch.finfo(torch.float32).tiny)
            per_concept = within_text.mean(dim=1) / by_concept.sum(-1)[:, None, :].clamp(min=1)  # (B, image tokens, C)
            gate = per_concept.amax(dim=-1).reshape(B, 1, *spatial_shape)
            self._record_gate(gate, prepared, "dry pass" if self.dry else "this pass", overwrite=True)
            if self.dry:
                self._dry_gate = gate
                return outs[0]
            self._gate = gate
        else:
            source = "dry pass" if cfg.schedule == "faithful" else ("this pass" if self._gate is not None else "previous pass")
            self._record_gate(self._gate_to_use(B), prepared, source, overwrite=False)
        g = self._gate_to_use(B).reshape(B, -1).to(torch.float32)  # (B, image tokens)
        mask = None
        if cfg.stage2 and cfg.suppression == "mask":
            blocked = torch.zeros(B, L, L, dtype=torch.bool, device=q.device)
            blocked[:, image] = (g > cfg.gate_threshold)[:, :, None] & live[:, None, :]
            mask = ~blocked[:, None] if bool(blocked.any()) else None
        if not (cfg.stage3 or (cfg.stage2 and cfg.suppression == "scale")):
            return _attend_sets(q, k, [v], mask)[0]
        o, c = _attend_sets(q, k, [v, v * live[:, None, :, None].to(v.dtype)], mask)  # c: the live keys' share
        o = o.clone()
        gi = g[:, None, :, None].to(o.dtype)  # (B, 1, image tokens, 1)
        c_img = c[:, :, image]
        if cfg.stage2 and cfg.suppression == "scale":  # their probabilities times (1 - G), not renormalised
            o[:, :, image] -= gi * c_img
            c_img = (1 - gi) * c_img
        if cfg.stage3:
            keep = gi if cfg.scrub == "soft" else (gi > cfg.scrub_threshold).to(o.dtype)
            o[:, :, image] -= keep * c_img
        return o

    def scrub(self, out: torch.Tensor, prepared: PreparedContext, spatial_shape: tuple[int, int], is_gating_layer: bool, *,
              q: torch.Tensor, k: torch.Tensor, heads: int, scale: float | None = None,
              gate_key: torch.Tensor | None = None) -> torch.Tensor:
        """Stage 3 on an attention output that someone else computed (``out``: batch, h*w, channels); the gate
        is read or computed from ``q`` and ``k`` exactly as ``attend`` does. Stage 2 cannot act here."""
        qh, kh = _heads(q, heads), _heads(k, heads)
        scale = qh.shape[-1] ** -0.5 if scale is None else scale
        g, _ = self._gate_for(qh, kh, heads, prepared, spatial_shape, is_gating_layer, scale, gate_key)
        return self._scrubbed(out, g)
