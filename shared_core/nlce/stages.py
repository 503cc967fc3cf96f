"""NLCE's work inside one denoiser call, as a pure tensor program (SPEC section 2; docs/nlce.md, "Compiled").

Nothing here branches on a tensor's value, makes a shape that depends on data or reads a value back to the host:
which rows and tokens are live, where the gate is high, whether the timestep is inside the window, all become masked
arithmetic with the same result as the branches they replace. A Python ``if`` here depends only on the settings and on
shapes, so one denoiser call with NLCE is one graph for ``torch.compile`` and replays under CUDA graphs.

- ``Operators``: a concept set's bases on one device; the concept scores ``||P_F x||`` and stage 1.
- ``prepare``: stage 1 on the context rows and the live tokens of one pass.
- ``gate_map`` / ``layer_terms`` / ``attend``: the gate at the gating layer and stages 2 and 3 in a UNet's
  cross-attention; ``joint_*``: the same in a joint-attention block (Flux, SD3; docs/nlce-joint-attention.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import NlceConfig


CHUNK_ROWS = 256  # basis rows a list's stage 1 solves together (Operators); the solve grows with their square


class Operators:
    """A concept set's operators on ``device``, fp32: per concept its basis ``U`` (d, r) and weights ``lambda``, and its
    neighbours' ``V``, ``mu`` (``P_F = U diag(lambda) U^T``, ``P_N = V diag(mu) V^T``), used through the bases: a
    score is ``||lambda * (x U)||`` and stage 1 is ``x - beta y + gamma P_N y`` with ``y = P_F x``, never a d x d
    matrix (what the rows of 4096-wide Flux/SD3 contexts and long concept lists need). With ``a = lambda * (x U)``
    (r values a row), ``y = a U^T`` and ``P_N y = a (U^T V) diag(mu) V^T``, so stage 1 is ``x + a K`` with one r x d
    ``K = gamma (U^T V) diag(mu) V^T - beta U^T``, built once: two thin products a concept, where the written-out
    formula takes nine operations. Products with a basis go through ``F.linear`` with the basis in the layout it wants (3x faster than
    ``x @ U`` for a thin ``U`` on a CPU).

    A list's concepts apply one after another (the last first), each to what the ones before left, so concept ``i``'s
    coefficients are ``a_i = m_i (x W_i^T + sum over the concepts j applied before it of a_j K_j W_i^T)`` (``W_i`` its
    ``lambda U^T``, ``m_i`` 1 where it applies to the row, else 0). Stacked over a chunk of concepts that is one
    unit lower-triangular system ``a (I - N D) = (x W^T) D``, with ``N`` the fixed products ``K_j W_i^T`` (built once,
    fp64) and ``D`` the row's ``m`` on the diagonal: one triangular solve a chunk gives every concept's coefficients at
    once, then ``x + a K``. The same arithmetic as the concept-by-concept loop, in a handful of operations a chunk of
    up to ``CHUNK_ROWS`` basis rows instead of three a concept: what a GPU that waits for its host pays for a list."""

    def __init__(self, concept_set, config: NlceConfig, device):
        f32 = lambda t: t.to(device=device, dtype=torch.float32).contiguous()  # noqa: E731  (one memory layout: one rounding)
        self.config, self.count = config, len(concept_set.concepts)
        # per concept (W = lambda U^T: r x d, K: r x d), from fp64 products of the fp32 bases (on the CPU: MPS has no
        # fp64), rounded once
        per = []
        for (b, w), nb in zip(concept_set.bases, concept_set.neighbor_bases):
            u, lam = b.detach().cpu().double(), w.detach().cpu().double()
            k = -config.beta * u.T
            if nb is not None and config.gamma:
                v, mu = nb[0].detach().cpu().double(), nb[1].detach().cpu().double()
                k = k + config.gamma * ((u.T @ v) * mu) @ v.T
            per.append((lam[:, None] * u.T, k))
        self.rank = max(w.shape[0] for w, _ in per)
        d = per[0][0].shape[1]
        # every concept's W stacked, zero-padded to one rank: all scores in one product
        stacked = torch.zeros(self.count, self.rank, d, dtype=torch.float64)
        for i, (w, _) in enumerate(per):
            stacked[i, : w.shape[0]] = w
        self.stacked = f32(stacked.reshape(-1, d))
        self.floor = config.live_floor * concept_set.live_floor_scale
        # stage 1's chunks: consecutive concepts, at most CHUNK_ROWS basis rows (at least one concept) each; per chunk
        # its stacked W and K (R x d), I and N (R x R: N[p, q] = K_p . W_q where row p's concept applies before row q's,
        # i.e. has the larger index), each row's concept, and how many concepts it holds
        self.chunks, start = [], 0
        while start < self.count:
            end, rows = start + 1, per[start][0].shape[0]
            while end < self.count and rows + per[end][0].shape[0] <= CHUNK_ROWS:
                rows, end = rows + per[end][0].shape[0], end + 1
            w, k = (torch.cat([per[i][j] for i in range(start, end)]) for j in (0, 1))
            owner = torch.cat([torch.full((per[i][0].shape[0],), i) for i in range(start, end)])
            n = (k @ w.T) * (owner[:, None] > owner[None, :])
            self.chunks.append((f32(w), f32(k), f32(torch.eye(rows)), f32(n), owner.to(device), end - start))
            start = end

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S) ``||P_F x_j||`` of every row ``x_j`` (x: B, S, d, fp32) for every concept."""
        proj = F.linear(x, self.stacked).unflatten(-1, (self.count, self.rank))  # (B, S, C, r)
        return proj.norm(dim=-1).transpose(1, 2)

    def stage1(self, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Rows ``x`` (B, S, d, fp32) through the product of their batch row's active concepts' operators
        ``P_1 P_2 ... P_k`` (the last applied first); a row with no active concept through all of them (stage 1 is
        global). ``active``: (B, C) bool."""
        use = (active | ~active.any(dim=-1, keepdim=True)).to(x.dtype)  # (B, C): a row that skips concept i has m_i 0
        for w, k, eye, n, owner, concepts in reversed(self.chunks):  # the last concepts first
            m = use[:, owner]  # (B, R): each basis row's concept's m
            a = F.linear(x, w) * m[:, None, :]
            if concepts > 1:  # a (I - N D) = (x W^T) D
                a = torch.linalg.solve_triangular(eye - n * m[:, None, :], a, upper=False, left=False, unitriangular=True)
            x = torch.baddbmm(x, a, k.expand(x.shape[0], *k.shape))
        return x


def live_token_mask(scores: torch.Tensor, candidates: torch.Tensor, ratio: float, floor: float) -> torch.Tensor:
    """Live if score > max(ratio * max candidate score, floor) (strict, as the reference); only candidate rows can be live."""
    s = scores.masked_fill(~candidates, 0.0)
    top = s.amax(dim=-1, keepdim=True)
    return candidates & (s > torch.clamp(ratio * top, min=floor))


def infer_token_mask(context: torch.Tensor) -> torch.Tensor:
    """Where a host cannot say which rows hold the prompt's words: every row but the first. The start row is the same
    for every prompt; end and padding rows cannot be told apart from words without the token ids, so they are scored
    too (hosts that know the ids pass them)."""
    mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
    mask[:, 0] = False
    return mask


@dataclass
class Prepared:
    """One pass's context rows and live tokens."""

    context: torch.Tensor          # rows for to_k / to_v (stage 1 applied inside the window)
    incoming: torch.Tensor         # the rows as they came in (the gate's keys at the gating layer)
    live: torch.Tensor             # (B, S) bool: live tokens of any concept
    live_by_concept: torch.Tensor  # (B, C, S) bool
    scores: torch.Tensor           # (B, C, S) ||P_F x||
    conditional: torch.Tensor      # (B,) bool: which rows are the prompt (not the negative / unconditional half)


def prepare(ops: Operators, context: torch.Tensor, conditional: torch.Tensor, words: torch.Tensor | None,
            window: torch.Tensor | None) -> Prepared:
    """Stage 1 and the live tokens of one pass. ``conditional``: (B,) bool; ``words``: (B, S) bool (None: inferred);
    ``window``: 0-d bool, True where stage 1 applies (inside the timestep window of a real pass), None where it never
    does (a dry pass, stage 1 off)."""
    cfg = ops.config
    B = context.shape[0]
    conditional = conditional.to(context.device, torch.bool).reshape(B)
    words = infer_token_mask(context) if words is None else words.to(context.device, torch.bool)
    x = context.float()
    scores = ops.scores(x)
    live = live_token_mask(scores, (words & conditional[:, None])[:, None, :], cfg.live_ratio, ops.floor)
    out = context
    if window is not None:
        out = torch.where(window, ops.stage1(x, live.any(dim=-1)).to(context.dtype), context)
    return Prepared(out, context, live.any(dim=1), live, scores, conditional)


# ------------------------------------------------------------------------------------------------ UNet cross-attention


def heads_of(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, n, heads*dh) -> (batch, heads, n, dh)."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def gate_map(logits: torch.Tensor, prepared: Prepared, spatial_shape) -> torch.Tensor:
    """(B, 1, h, w) fp32 from the gating layer's logits (B, heads, N, S): per concept the head-averaged probability given
    to its live tokens, mean over them; max over concepts. 0 for a row without live tokens."""
    mean_probs = logits.float().softmax(dim=-1).mean(dim=1)  # (B, N, S)
    lbc = prepared.live_by_concept.to(mean_probs.dtype)
    per_concept = torch.einsum("bns,bcs->bcn", mean_probs, lbc) / lbc.sum(-1, keepdim=True).clamp(min=1)
    return per_concept.amax(dim=1).reshape(logits.shape[0], 1, *spatial_shape)


def _additive(blocked: torch.Tensor, dtype) -> torch.Tensor:
    """The attention mask that takes the ``blocked`` logits out, additive (0 / -inf in ``dtype``)."""
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill_(blocked, float("-inf"))


def layer_terms(config: NlceConfig, gate: torch.Tensor, spatial_shape, prepared: Prepared, dtype, stage2: bool = True) -> dict:
    """What every cross-attention layer at one resolution takes from ``gate`` (B, 1, h, w; 0 where nothing is to
    change): stage 2's additive ``mask`` (B, 1, N, S) or the live tokens' ``factor`` (B, 1, N, 1) (not with
    ``stage2=False``: another attention computes the output), and stage 3's ``keep`` (B, N, 1)."""
    B = gate.shape[0]
    g = gate if tuple(gate.shape[-2:]) == tuple(spatial_shape) else \
        F.interpolate(gate, size=tuple(spatial_shape), mode="bilinear", align_corners=False)
    g = g.view(B, 1, -1, 1)  # (B, 1, N, 1), fp32
    terms = {}
    stage2 = stage2 and config.stage2
    if stage2 and config.suppression == "mask":  # live logits -> -inf where the gate is high; softmax renormalises
        terms["mask"] = _additive((g > config.gate_threshold) & prepared.live[:, None, None, :], dtype)
    elif stage2:  # scale: the live tokens' probabilities times (1 - G): their share of the output times G, taken off
        terms["factor"] = g.to(dtype)
        terms["live"] = prepared.live[:, None, :, None].to(dtype)
    if config.stage3:
        keep = (1.0 - g) if config.scrub == "soft" else (g <= config.scrub_threshold).to(torch.float32)
        terms["keep"] = keep.view(B, -1, 1).to(dtype)
    return terms


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, terms: dict, scale: float | None = None) -> torch.Tensor:
    """Cross-attention output before ``to_out`` (batch, h*w, heads*dim) with stages 2 and 3 as ``terms`` say (empty:
    the plain attention). ``scale``: None for SDPA's default, exactly as the hosts' plain attention."""
    B, N, C = q.shape
    qh, kh, vh = heads_of(q, heads), heads_of(k, heads), heads_of(v, heads)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=terms.get("mask"), scale=scale)
    if "factor" in terms:  # sum_j p_j f_j v_j with f = 1 - G on live tokens = plain - G * (the live tokens' share)
        share = F.scaled_dot_product_attention(qh, kh, vh * terms["live"], scale=scale)
        out = out - terms["factor"] * share
    out = out.transpose(1, 2).reshape(B, N, C)
    return out * terms["keep"] if "keep" in terms else out


# ------------------------------------------------------------------------------------------------ joint attention


def joint_layout(prepared: Prepared, text: slice, L: int, D: int, dtype, device) -> dict:
    """Per pass and layout (every block of a pass shares it): the live keys, each concept's live-key count, and the
    indicator value sets the gating block attends over (1 + concepts channels, padded to the head size)."""
    B, C, _ = prepared.live_by_concept.shape
    by_concept = torch.zeros(B, C, L, dtype=torch.bool, device=device)
    by_concept[:, :, text] = prepared.live_by_concept.to(device)[:, :, : text.stop - text.start]
    live = by_concept.any(dim=1)  # (B, L)
    marks = torch.zeros(B, L, D * -(-(1 + C) // D), dtype=dtype, device=device)  # 1 + C channels, padded
    marks[:, text, 0] = 1
    marks[:, :, 1: 1 + C] = by_concept.transpose(1, 2).to(dtype)
    return {"concepts": C, "live_keys": live, "live": live[:, None, :, None].to(dtype),
            "count": by_concept.sum(-1)[:, None, :].clamp(min=1),
            "marks": [marks[:, None, :, i: i + D] for i in range(0, marks.shape[-1], D)]}


def image_slice(text: slice, L: int) -> slice:
    return slice(text.stop, L) if text.start == 0 else slice(0, text.start)


def joint_gate(q: torch.Tensor, k: torch.Tensor, layout: dict, text: slice, spatial_shape) -> torch.Tensor:
    """(B, 1, h, w) fp32: the gate read in a joint block, the softmax restricted to the text keys, as a UNet's
    cross-attention has it (a concept's live share / the text share, mean over its live keys and the heads, max over
    concepts), from attention calls of the image queries over the block's keys with indicator values."""
    B, H, L, D = q.shape
    qi = q[:, :, image_slice(text, L)]
    marks = [F.scaled_dot_product_attention(qi, k, m.expand(B, H, L, D)) for m in layout["marks"]]
    shares = torch.cat(marks, dim=-1)[..., : 1 + layout["concepts"]].float()
    within_text = shares[..., 1:] / shares[..., :1].clamp(min=torch.finfo(torch.float32).tiny)
    per_concept = within_text.mean(dim=1) / layout["count"]  # (B, image tokens, C)
    return per_concept.amax(dim=-1).reshape(B, 1, *spatial_shape)


def joint_terms(config: NlceConfig, gate: torch.Tensor, layout: dict, text: slice, L: int, dtype) -> dict:
    """What every block of a pass takes from ``gate``: stage 2's additive mask over (query, key) or None, and the factor
    ``coef`` (B, 1, image tokens, 1) of the live keys' share taken off an image query's output (stage 2 'scale', stage
    3), or None."""
    B = gate.shape[0]
    image = image_slice(text, L)
    g = gate.reshape(B, -1).to(torch.float32)  # (B, image tokens)
    mask = None
    if config.stage2 and config.suppression == "mask":
        mask = torch.zeros(B, 1, L, L, dtype=dtype, device=g.device)  # text queries: nothing blocked
        mask[:, 0, image] = _additive((g > config.gate_threshold)[:, :, None] & layout["live_keys"][:, None, :], dtype)
    gi = g[:, None, :, None]
    coef = None
    if config.stage2 and config.suppression == "scale":  # their probabilities times (1 - G), not renormalised
        coef = gi
    if config.stage3:
        keep = gi if config.scrub == "soft" else (gi > config.scrub_threshold).to(torch.float32)
        coef = keep if coef is None else coef + keep * (1 - gi)  # scrub what scaling left
    return {"mask": mask, "coef": None if coef is None else coef.to(dtype)}


def joint_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: slice, layout: dict, terms: dict) -> torch.Tensor:
    """One joint-attention block (q, k, v: batch, heads, tokens, dim; the text tokens at ``text``) with stages 2 and 3 on
    the image queries (text queries are never changed): the block's attention with stage 2's mask, then the live keys'
    share of each image query's output times ``coef`` taken off. Returns (batch, heads, tokens, dim)."""
    mask = terms["mask"]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if terms["coef"] is not None:
        image = image_slice(text, q.shape[2])
        share = F.scaled_dot_product_attention(q[:, :, image], k, v * layout["live"],
                                               attn_mask=None if mask is None else mask[:, :, image])
        o[:, :, image].addcmul_(terms["coef"], share, value=-1)
    return o
