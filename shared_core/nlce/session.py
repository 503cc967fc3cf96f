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
    """Live if score >= max(ratio * max candidate score, floor); only candidate rows can be live."""
    s = scores.masked_fill(~candidates, 0.0)
    top = s.amax(dim=-1, keepdim=True)
    return candidates & (s >= torch.clamp(ratio * top, min=floor))


class NlceSession:
    """State of one sampling run (gates carry from pass to pass)."""

    def __init__(self, concept_set: ConceptSet, config: NlceConfig | None = None, record_maps: bool = False):
        self.concepts = concept_set
        self.config = config or concept_set.config
        self.record_maps = record_maps
        self.diagnostics: list[dict] = []
        self.timestep = 0.0
        self.dry = False
        self._gate = None        # gate of the current pass (B, 1, h, w)
        self._prev_gate = None   # gate of the previous real pass (single-pass schedule)
        self._dry_gate = None    # gate of the latest dry pass (faithful schedule)
        self._prepared: dict = {}
        self._ops: dict = {}

    # -- passes --------------------------------------------------------------------------------

    def in_window(self, timestep: float) -> bool:
        return float(timestep) <= self.config.t_max

    @property
    def intervening(self) -> bool:
        return not self.dry and self.in_window(self.timestep)

    def begin_pass(self, timestep: float, dry: bool = False) -> None:
        """Call once per UNet forward before its first cross-attention (timestep on a 0..1000 scale)."""
        if self.diagnostics and not self.dry:
            self._prev_gate = self._gate
        last = next((d["timestep"] for d in reversed(self.diagnostics) if not d["dry"]), None)
        if last is not None and float(timestep) > last:  # timesteps went up: a new sampling run, no gate carries over
            self._prev_gate = None
        if dry:
            self._dry_gate = None
        self._gate = None
        self.dry, self.timestep = dry, float(timestep)
        self._prepared = {}
        self.diagnostics.append({"pass": len(self.diagnostics), "timestep": self.timestep, "dry": dry,
                                 "intervened": self.intervening, "live_tokens": None, "active": None, "gate": None})

    # -- stage 1 and live tokens ---------------------------------------------------------------

    def _operator(self, active: tuple[int, ...], device, dtype) -> torch.Tensor:
        key = (active, device, dtype)
        if key not in self._ops:
            cfg, cs = self.config, self.concepts
            m = torch.eye(cs.width, dtype=torch.float32, device=device)
            for i in active:  # P_multi = P_1 P_2 ... P_k
                m = m @ cs.modulation(i, cfg.beta, cfg.gamma).to(device)
            self._ops[key] = m.T.contiguous().to(dtype)  # rows: x' = x P_multi^T
        return self._ops[key]

    def prepare(self, context: torch.Tensor, cond: torch.Tensor, token_mask: torch.Tensor | None = None) -> PreparedContext:
        """Stage-1 context and live tokens for one pass (cached: call it in every layer)."""
        key = (context.data_ptr(), tuple(context.shape), context.dtype, context.device)
        if key in self._prepared:
            return self._prepared[key]
        cfg, cs = self.config, self.concepts
        B, S, _ = context.shape
        cond = torch.as_tensor(cond, dtype=torch.bool, device=context.device).reshape(B)
        tokens = infer_token_mask(context) if token_mask is None else token_mask.to(context.device, torch.bool)
        x = context.float()
        projs = torch.stack([cs.concept_projector(i).to(x.device) for i in range(len(cs.concepts))])  # (C, d, d)
        scores = torch.einsum("bsd,cde->bcse", x, projs).norm(dim=-1)  # (B, C, S)
        candidates = (tokens & cond[:, None])[:, None, :].expand_as(scores)
        live = live_token_mask(scores, candidates, cfg.live_ratio, cfg.live_floor)
        out = context
        if cfg.stage1 and self.intervening:
            active = live.any(dim=-1)  # (B, C)
            rows = []
            for b in range(B):
                idx = tuple(int(i) for i in torch.nonzero(active[b]).flatten()) or tuple(range(len(cs.concepts)))
                rows.append(x[b] @ self._operator(idx, x.device, torch.float32))
            out = torch.stack(rows).to(context.dtype)
        prepared = PreparedContext(out, live.any(dim=1), live, scores)
        self._prepared[key] = prepared
        entry = self.diagnostics[-1] if self.diagnostics else None
        if entry is not None and entry["live_tokens"] is None:
            entry["live_tokens"] = [torch.nonzero(prepared.live[b]).flatten().tolist() for b in range(B)]
            entry["active"] = [[c for i, c in enumerate(cs.concepts) if live[b, i].any()] for b in range(B)]
        return prepared

    # -- stages 2 and 3 ------------------------------------------------------------------------

    def _gate_for(self, B: int, is_gating_layer: bool):
        if self.config.schedule == "faithful":
            g = self._dry_gate
        else:
            g = self._gate if self._gate is not None else (None if is_gating_layer else self._prev_gate)
        return g if g is not None and g.shape[0] == B else None

    def _record_gate(self, gate: torch.Tensor, prepared: PreparedContext) -> None:
        entry = self.diagnostics[-1] if self.diagnostics else None
        if entry is None:
            return
        rows = prepared.live.any(dim=-1)
        g = gate[rows] if rows.any() else gate
        entry["gate"] = {"mean": float(g.mean()), "max": float(g.max()),
                         "area": float((g > self.config.gate_threshold).float().mean()), "shape": list(gate.shape[-2:])}
        if self.record_maps:
            entry["gate_map"] = gate[:, 0].detach().float().cpu()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, prepared: PreparedContext,
               spatial_shape: tuple[int, int], is_gating_layer: bool, scale: float | None = None) -> torch.Tensor:
        """Cross-attention output before ``to_out``: (batch, h*w, heads*dim) with stages 2 and 3."""
        cfg = self.config
        B, N, C = q.shape
        dh = C // heads
        qh, kh, vh = (t.reshape(B, -1, heads, dh).transpose(1, 2) for t in (q, k, v))
        sdpa_scale = scale  # None: SDPA's own default, exactly as the hosts' plain attention
        scale = dh ** -0.5 if scale is None else scale
        has_live = bool(prepared.live.any())
        wants_gate = has_live and (cfg.stage2 or cfg.stage3)
        compute_gate = is_gating_layer and wants_gate and (self.dry or (self.intervening and cfg.schedule == "single-pass"))
        gate = self._gate_for(B, is_gating_layer) if (wants_gate and self.intervening) else None
        probs = None
        if compute_gate:
            probs = (qh.float() @ kh.float().transpose(-1, -2) * scale).softmax(dim=-1)  # (B, h, N, S)
            mean_probs = probs.mean(dim=1)  # (B, N, S)
            lbc = prepared.live_by_concept.to(mean_probs.dtype)  # (B, K, S)
            per_concept = torch.einsum("bns,bks->bkn", mean_probs, lbc) / lbc.sum(-1, keepdim=True).clamp(min=1)
            new_gate = per_concept.amax(dim=1).reshape(B, 1, *spatial_shape)
            if self.dry:
                self._dry_gate = new_gate
            else:
                self._gate = gate = new_gate
            self._record_gate(new_gate, prepared)
        if gate is None:
            if probs is not None:
                out = probs.to(vh.dtype) @ vh
            else:
                out = F.scaled_dot_product_attention(qh, kh, vh, scale=sdpa_scale)
            return out.transpose(1, 2).reshape(B, N, C)
        g = gate if tuple(gate.shape[-2:]) == tuple(spatial_shape) else \
            F.interpolate(gate.float(), size=spatial_shape, mode="bilinear", align_corners=False)
        g = g.reshape(B, N).to(torch.float32)
        live = prepared.live[:, None, :]  # (B, 1, S)
        if cfg.stage2 and cfg.suppression == "mask":
            blocked = (g > cfg.gate_threshold)[:, :, None] & live  # (B, N, S)
            if probs is not None:
                logits = (qh.float() @ kh.float().transpose(-1, -2) * scale).masked_fill(blocked[:, None], float("-inf"))
                out = logits.softmax(-1).to(vh.dtype) @ vh
            else:
                out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=~blocked[:, None], scale=sdpa_scale)
        elif cfg.stage2:  # scale: probabilities of live tokens times (1 - G), not renormalised
            if probs is None:
                probs = (qh.float() @ kh.float().transpose(-1, -2) * scale).softmax(dim=-1)
            factor = torch.where(live, 1.0 - g[:, :, None], torch.ones((), device=g.device))  # (B, N, S)
            out = (probs * factor[:, None]).to(vh.dtype) @ vh
        elif probs is not None:
            out = probs.to(vh.dtype) @ vh
        else:
            out = F.scaled_dot_product_attention(qh, kh, vh, scale=sdpa_scale)
        out = out.transpose(1, 2).reshape(B, N, C)
        if cfg.stage3:
            keep = (1.0 - g) if cfg.scrub == "soft" else (g <= cfg.scrub_threshold).to(torch.float32)
            out = out * keep[:, :, None].to(out.dtype)
        return out
