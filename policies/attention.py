"""One attention processor for FLUX blocks with per-call features: reference attention-map capture
(MultiCrafter Eq. 4), MUSAR static and dynamic routing (Sec. 3.2, Eq. 2-4) and One-for-All's Dynamic
Attention Modulation (Eq. 4-5). With every feature off it computes exactly what diffusers'
FluxAttnProcessor computes.

The joint attention sequence is [text (T), noisy (N), reference_1 (n_1), ..., reference_R (n_R)] in both
block types (double blocks concatenate [text, image] before attending; single blocks carry it whole).
With MUSAR's per-condition prompts the text part is [prompt, caption_1, ..., caption_R]: reference i's
caption tokens CT^i ride in the text stream and belong to condition i (its CI^i) in the routing masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections


class TokenLayout(NamedTuple):
    """Where each part sits in the joint sequence; shared by every sample of a batch."""

    text: int  # the text stream: the prompt, then any condition captions
    noisy: int
    references: tuple[int, ...]  # token count of each reference, in sequence order
    captions: tuple[int, ...] = ()  # token count of each reference's caption (MUSAR CT^i), at the end of the text

    @property
    def total(self) -> int:
        return self.text + self.noisy + sum(self.references)

    @property
    def prompt(self) -> int:
        """Tokens of the target prompt T (the text before the condition captions)."""
        return self.text - sum(self.captions)

    def reference_slices(self) -> list[slice]:
        """Slices of each reference in the joint sequence."""
        slices, start = [], self.text + self.noisy
        for n in self.references:
            slices.append(slice(start, start + n))
            start += n
        return slices


# ---- pure math ----------------------------------------------------------------------------------------


def static_routing_mask(layout: TokenLayout) -> torch.Tensor:
    """MUSAR static attention routing (Sec. 3.2) as a boolean "may attend" mask (L, L), query rows x key
    columns: prompt <-> condition blocked both ways (prompt-condition decoupling); condition i <-> j
    blocked for i != j (inter-condition isolation). Everything else (noisy <-> all, prompt <-> prompt,
    condition i <-> itself) is allowed. Condition i is its reference tokens and, with per-condition
    prompts, its caption tokens."""
    segment = _segment_index(layout)  # (L,): 0 prompt, 1 noisy, 2 + i condition i
    query, key = segment[:, None], segment[None, :]
    prompt_condition = ((query == 0) & (key >= 2)) | ((query >= 2) & (key == 0))
    cross_condition = (query >= 2) & (key >= 2) & (query != key)
    return ~(prompt_condition | cross_condition)


def _segment_index(layout: TokenLayout) -> torch.Tensor:
    """(L,) segment of each token: 0 the target prompt, 1 noisy, 2 + i condition i (reference i's tokens and
    its caption tokens)."""
    conditions = len(layout.references)
    if layout.captions and len(layout.captions) != conditions:
        raise ValueError(f"the layout has {len(layout.captions)} condition captions for {conditions} references")
    labels = [0, *(2 + i for i in range(len(layout.captions))), 1, *(2 + i for i in range(conditions))]
    sizes = [layout.prompt, *layout.captions, layout.noisy, *layout.references]
    return torch.repeat_interleave(torch.tensor(labels), torch.tensor(sizes))


def prompt_similarity(noisy_query: torch.Tensor, text_key: torch.Tensor) -> torch.Tensor:
    """MUSAR Eq. 2: S = softmax(Q_X K_T^T / sqrt(d)) over the prompt tokens, averaged over heads.
    noisy_query (B, H, N, d), text_key (B, H, T, d) -> S (B, N, T) in fp32."""
    scale = noisy_query.shape[-1] ** -0.5
    scores = torch.einsum("bhnd,bhtd->bhnt", noisy_query.float(), text_key.float()) * scale
    return scores.softmax(dim=-1).mean(dim=1)


def condition_affinity(
    noisy_query: torch.Tensor, text_key: torch.Tensor, prompt_spans: tuple[tuple[int, int], ...]
) -> torch.Tensor:
    """MUSAR Eq. 3: S*_{x,k} = mean of S (prompt_similarity) over the prompt span [p_k, p_k + l_k) of
    condition k. noisy_query (B, H, N, d), text_key (B, H, T, d) -> S* (B, N, R) in fp32."""
    similarity = prompt_similarity(noisy_query, text_key)  # (B, N, T)
    return torch.stack([similarity[..., start:end].mean(dim=-1) for start, end in prompt_spans], dim=-1)


def prompt_routing_maps(
    noisy_query: torch.Tensor, text_key: torch.Tensor, sample_spans: Sequence[Sequence[tuple[int, int]]]
) -> torch.Tensor:
    """Soft routing maps from the prompt router that dynamic routing uses: M_k(x) = sum of S(x, t) over
    the tokens t of subject k's phrase, the share of noisy token x's prompt attention that goes to that
    phrase. Each M_k is in [0, 1] and sum_k M_k <= 1 (the rest, on the other prompt tokens, plays
    AnyStory's background route). These are the maps AnyStory's routing loss supervises (Eq. 4).
    noisy_query (B, H, N, d), text_key (B, H, T, d), sample_spans: B tuples of R [start, end) spans (each
    sample's own phrases) -> (B, R, N) in fp32, differentiable."""
    similarity = prompt_similarity(noisy_query, text_key)  # (B, N, T)
    if len(sample_spans) != similarity.shape[0]:
        raise ValueError(f"{len(sample_spans)} span tuples for a batch of {similarity.shape[0]}")
    return torch.stack([
        torch.stack([similarity[b, :, start:end].sum(dim=-1) for start, end in spans]) for b, spans in enumerate(sample_spans)
    ])


def dynamic_routing_mask(assignment: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """MUSAR Eq. 4: noisy token x may attend the tokens of condition k (its reference and any caption
    tokens) only if k == assignment[x] (argmax_k S*_{x,k}); all other rows and columns are untouched.
    assignment (B, N) long -> "may attend" mask (B, L, L) bool."""
    b = assignment.shape[0]
    segment = _segment_index(layout).to(assignment.device)  # (L,)
    mask = torch.ones(b, layout.total, layout.total, dtype=torch.bool, device=assignment.device)
    noisy_rows = slice(layout.text, layout.text + layout.noisy)
    key_condition = segment - 2  # (L,) condition index of each key, negative for text/noisy
    is_condition_key = key_condition >= 0
    allowed = key_condition[None, None, :] == assignment[:, :, None]  # (B, N, L)
    mask[:, noisy_rows, :] = ~is_condition_key[None, None, :] | allowed
    return mask


def reference_attention_map(query_rows: torch.Tensor, noisy_key: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """One reference's attention map over the noisy tokens (MultiCrafter Eq. 4):
    m_j = 1/(H n) sum_{h, r} softmax_j(q_{h,r} . k_{h,j} / sqrt(d)), the softmax taken over the noisy keys j.

    Computed in fp32 chunks of ``chunk_rows`` query rows, forward and backward, so no more than one
    (B, H, chunk, N) block of probabilities exists at a time and nothing of that size is saved for the
    backward pass (see _ChunkedReferenceMap).
    query_rows (B, H, n, d) post-RoPE reference queries, noisy_key (B, H, N, d) -> (B, N) in fp32 (fp64
    for fp64 inputs)."""
    return _ChunkedReferenceMap.apply(query_rows, noisy_key, chunk_rows)


class _ChunkedReferenceMap(torch.autograd.Function):
    """reference_attention_map with a hand-written chunked backward. With P = softmax(S) row-wise,
    S = q k^T / sqrt(d) and the incoming gradient g_j of m_j, each row gets G_j = g_j / (H n) and
    dS = P * (G - sum_j P G) (softmax backward); dq = dS k / sqrt(d), dk = dS^T q / sqrt(d).
    P is recomputed chunk by chunk; only q and k are saved."""

    @staticmethod
    def forward(ctx, query_rows, noisy_key, chunk_rows):
        b, h, n, _ = query_rows.shape
        ctx.save_for_backward(query_rows, noisy_key)
        ctx.chunk_rows = chunk_rows
        total = torch.zeros(b, noisy_key.shape[2], dtype=_compute_dtype(query_rows), device=query_rows.device)
        for start in range(0, n, chunk_rows):
            total += _row_softmax(query_rows[:, :, start : start + chunk_rows], noisy_key).sum(dim=(1, 2))
        return total / (h * n)

    @staticmethod
    def backward(ctx, grad_map):
        query_rows, noisy_key = ctx.saved_tensors
        b, h, n, d = query_rows.shape
        scale = d**-0.5
        dtype = _compute_dtype(query_rows)
        key = noisy_key.to(dtype)
        weight = (grad_map.to(dtype) / (h * n))[:, None, None, :]  # G: (B, 1, 1, N)
        grad_query = torch.empty(query_rows.shape, dtype=dtype, device=query_rows.device)
        grad_key = torch.zeros(noisy_key.shape, dtype=dtype, device=noisy_key.device)
        for start in range(0, n, ctx.chunk_rows):
            rows = query_rows[:, :, start : start + ctx.chunk_rows].to(dtype)
            probabilities = _row_softmax(rows, key)  # (B, H, c, N)
            grad_scores = probabilities * (weight - (probabilities * weight).sum(dim=-1, keepdim=True))
            grad_query[:, :, start : start + ctx.chunk_rows] = torch.einsum("bhrj,bhjd->bhrd", grad_scores, key) * scale
            grad_key += torch.einsum("bhrj,bhrd->bhjd", grad_scores, rows) * scale
        return grad_query.to(query_rows.dtype), grad_key.to(noisy_key.dtype), None


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp32, or the input's dtype when it is wider (fp64 in tests)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _row_softmax(query_chunk: torch.Tensor, noisy_key: torch.Tensor) -> torch.Tensor:
    # (B, H, c, d) x (B, H, N, d) -> softmax over the N keys, at least fp32: (B, H, c, N)
    dtype = _compute_dtype(query_chunk)
    scores = torch.einsum("bhrd,bhjd->bhrj", query_chunk.to(dtype), noisy_key.to(dtype)) * query_chunk.shape[-1] ** -0.5
    return scores.softmax(dim=-1)


def full_attention_reference_maps(query: torch.Tensor, key: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """The naive capture the chunked one replaces (used as the benchmark's baseline and the tests'
    reference): materialize the full (B, H, L, L) fp32 softmax over all keys, take the reference rows
    and noisy columns and renormalize them over the noisy columns (a softmax restricted to a subset of
    keys equals the full softmax renormalized on that subset). query, key (B, H, L, d) -> (B, R, N)."""
    scores = torch.einsum("bhqd,bhkd->bhqk", query.float(), key.float()) * query.shape[-1] ** -0.5
    probabilities = scores.softmax(dim=-1)
    noisy = slice(layout.text, layout.text + layout.noisy)
    maps = []
    for rows in layout.reference_slices():
        block = probabilities[:, :, rows, noisy]
        block = block / block.sum(dim=-1, keepdim=True)
        maps.append(block.mean(dim=(1, 2)))
    return torch.stack(maps, dim=1)


def normalize_maps(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min-max normalize each map to [0, 1] over its tokens: (m - min) / (max - min + eps).
    maps (B, R, N) -> (B, R, N)."""
    low = maps.amin(dim=-1, keepdim=True)
    high = maps.amax(dim=-1, keepdim=True)
    return (maps - low) / (high - low + eps)


class TemperatureMLP(torch.nn.Module):
    """One-for-All Dynamic Attention Modulation (Eq. 4): f_temp = softplus(MLP(W_q f)) + t_min per token,
    from the block's query (all heads, after QK-norm). The last layer starts at zero weight and bias
    softplus^{-1}(1 - t_min), so every temperature starts at (1 - t_min) + t_min = 1, up to float rounding."""

    def __init__(self, query_dim: int, hidden: int, t_min: float):
        super().__init__()
        self.t_min = t_min
        self.hidden = torch.nn.Linear(query_dim, hidden)
        self.out = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.constant_(self.out.bias, math.log(math.expm1(1.0 - t_min)))

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        # query (B, L, H, d) -> temperature (B, L, 1, 1), broadcast over heads and head dims
        features = query.flatten(2).to(self.out.weight.dtype)
        temperature = F.softplus(self.out(F.gelu(self.hidden(features)))) + self.t_min
        return temperature[..., None]


def _noisy_queries_and_prompt_keys(query: torch.Tensor, key: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """What MUSAR Eq. 2 compares: the noisy tokens' queries and the target prompt's keys (never the
    condition captions). query, key (B, L, H, d) -> (B, H, N, d), (B, H, T_prompt, d)."""
    noisy = query[:, layout.text : layout.text + layout.noisy].transpose(1, 2)
    return noisy, key[:, : layout.prompt].transpose(1, 2)


# ---- per-call control ----------------------------------------------------------------------------------


CaptureMethod = Literal["chunked", "full"]


@dataclass
class AttentionControl:
    """What the processors do in one model call; built fresh for each call by the policy.

    ``captured`` collects one (B, R, N) map per double block (in block order) when ``capture`` is on.
    ``prompt_spans`` are the prompt-token spans [start, end) of each reference's description, in
    reference order (needed by dynamic routing)."""

    layout: TokenLayout
    capture: bool = False
    capture_method: CaptureMethod = "chunked"
    capture_chunk_rows: int = 256
    static_routing: bool = False
    dynamic_routing: bool = False
    temperature: bool = False
    capture_routing: bool = False
    prompt_spans: tuple[tuple[int, int], ...] | None = None
    routing_spans: tuple[tuple[tuple[int, int], ...], ...] | None = None  # per sample, for capture_routing
    captured: list[torch.Tensor] = field(default_factory=list)
    routing_maps: list[torch.Tensor] = field(default_factory=list)  # (B, R, N) per double block when capture_routing
    routing_assignments: list[torch.Tensor] = field(default_factory=list)  # (B, N) per block, observable
    _static_mask: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        references = len(self.layout.references)
        needs_shared = self.dynamic_routing or (self.capture_routing and self.routing_spans is None)
        if needs_shared and (self.prompt_spans is None or len(self.prompt_spans) != references):
            raise ValueError(
                "dynamic routing and routing-map capture need prompt_spans: one [start, end) prompt-token span per reference "
                f"({references}), got {self.prompt_spans!r}"
            )
        if self.routing_spans is not None and any(len(spans) != references for spans in self.routing_spans):
            raise ValueError(f"routing_spans must give each sample one span per reference ({references}), got {self.routing_spans!r}")

    def sample_routing_spans(self, batch: int) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Each sample's phrase spans for routing-map capture (a batch-1 conditioning broadcasts)."""
        spans = self.routing_spans if self.routing_spans is not None else (self.prompt_spans,)
        if len(spans) == 1:
            return spans * batch
        if len(spans) != batch:
            raise ValueError(f"routing_spans has {len(spans)} entries for a batch of {batch}")
        return spans

    def static_mask(self, device: torch.device) -> torch.Tensor:
        if self._static_mask is None or self._static_mask.device != device:
            self._static_mask = static_routing_mask(self.layout).to(device)
        return self._static_mask


class PolicyAttnProcessor(torch.nn.Module):
    """Drop-in for diffusers' FluxAttnProcessor. ``double_block`` marks double-block attentions (the
    only ones that capture maps). ``temperature`` is the block's Dynamic Attention Modulation MLP, or
    None when the policy has none."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, double_block: bool, temperature: TemperatureMLP | None = None):
        super().__init__()
        self.double_block = double_block
        self.temperature = temperature

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_control: AttentionControl | None = None,
    ):
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        control = attention_control
        if control is not None and control.temperature:
            if self.temperature is None:
                raise ValueError("attention temperature requested but the policy was built without it (attention.temperature)")
            # softmax(q k^T / (sqrt(d) tau)) == softmax((q / tau) k^T / sqrt(d)): fold tau into q (Eq. 5)
            query = query / self.temperature(query).to(query.dtype)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if control is not None:
            attention_mask = self._routing_mask(control, query, key, attention_mask)
            if control.capture and self.double_block:
                # the maps use the queries the block attends with (after any temperature, post-RoPE)
                control.captured.append(self._capture(control, query, key))
            if control.capture_routing and self.double_block:
                spans = control.sample_routing_spans(query.shape[0])
                control.routing_maps.append(prompt_routing_maps(*_noisy_queries_and_prompt_keys(query, key, control.layout), spans))

        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states

    @staticmethod
    def _routing_mask(control, query, key, attention_mask):
        # query, key (B, L, H, d) post-RoPE; returns a bool "may attend" mask broadcastable to (B, H, L, L)
        layout = control.layout
        if query.shape[1] != layout.total:
            raise ValueError(f"attention sequence has {query.shape[1]} tokens but the layout describes {layout.total}")
        masks = []
        if control.static_routing:
            masks.append(control.static_mask(query.device)[None])
        if control.dynamic_routing:
            with torch.no_grad():  # the assignment is a hard argmax (Eq. 4): nothing to differentiate
                affinity = condition_affinity(*_noisy_queries_and_prompt_keys(query, key, layout), control.prompt_spans)
            assignment = affinity.argmax(dim=-1)  # (B, N)
            control.routing_assignments.append(assignment)
            masks.append(dynamic_routing_mask(assignment, layout))
        if not masks:
            return attention_mask
        if attention_mask is not None:
            raise ValueError("attention routing cannot be combined with an external attention_mask")
        mask = masks[0] if len(masks) == 1 else masks[0] & masks[1]
        return mask[:, None]  # (B or 1, 1, L, L)

    @staticmethod
    def _capture(control, query, key):
        # query, key (B, L, H, d) post-RoPE -> (B, R, N) reference maps of this block
        layout = control.layout
        q, k = query.transpose(1, 2), key.transpose(1, 2)  # (B, H, L, d)
        if control.capture_method == "full":
            return full_attention_reference_maps(q, k, layout)
        noisy_key = k[:, :, layout.text : layout.text + layout.noisy]
        maps = [reference_attention_map(q[:, :, rows], noisy_key, control.capture_chunk_rows) for rows in layout.reference_slices()]
        return torch.stack(maps, dim=1)
