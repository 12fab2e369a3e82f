"""Latent packing and FLUX's 3-axis rotary position ids (t, h, w) for the sequence
[text, noisy, reference_1, ..., reference_N]. Pure functions of shapes; ids are float (S, 3) tensors
shared by the whole batch, as diffusers' FluxPosEmbed expects."""

from __future__ import annotations

from typing import Sequence

import torch

from policies.config import PositionScheme

GridSize = tuple[int, int]  # (rows, cols) of a packed token grid


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): 2x2 patches, row-major, channels-major inside a patch
    (diffusers' FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {h}x{w}")
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, grid: GridSize) -> torch.Tensor:
    """Inverse of pack_latents: (B, rows * cols, 4C) -> (B, C, 2 rows, 2 cols)."""
    b, n, packed = tokens.shape
    rows, cols = grid
    if n != rows * cols:
        raise ValueError(f"{n} tokens do not fill a {rows}x{cols} grid")
    patches = tokens.view(b, rows, cols, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, packed // 4, rows * 2, cols * 2)


def grid_ids(grid: GridSize, t: float = 0.0, row_offset: float = 0.0, col_offset: float = 0.0) -> torch.Tensor:
    """Ids of a packed grid, row-major: token (r, c) -> (t, row_offset + r, col_offset + c). (rows*cols, 3)"""
    rows, cols = grid
    r = torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, cols)
    c = torch.arange(cols, dtype=torch.float32)[None, :].expand(rows, cols)
    ids = torch.stack([torch.full_like(r, float(t)), r + row_offset, c + col_offset], dim=-1)
    return ids.reshape(rows * cols, 3)


def reference_ids(
    scheme: PositionScheme,
    noisy_grid: GridSize,
    reference_grids: Sequence[GridSize],
    condition_ids: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Ids of each reference's tokens (noisy tokens are always grid_ids(noisy_grid): (0, r, c)).

    - ``uno`` (UNO): t = 0, diagonal offsets after the target grid: reference i starts at
      (H + sum_{j<i} h_j, W + sum_{j<i} w_j), where (H, W) is the noisy grid and (h_j, w_j) the grids of
      the earlier references.
    - ``kontext`` (FLUX.1 Kontext): t = 1, no spatial offset: (1, r, c) for every reference.
    - ``condition_id`` (One-for-All Eq. 2): t = 1, offset by the category id ID_i of reference i:
      (1, r + ID_i h_i, c + ID_i w_i) (face 1, upper garment 2, lower garment 3, bag 4).
    """
    if scheme == "condition_id":
        if condition_ids is None or len(condition_ids) != len(reference_grids):
            raise ValueError(
                f"position scheme 'condition_id' needs one condition id per reference "
                f"({len(reference_grids)}), got {condition_ids!r}"
            )
        return [
            grid_ids(g, t=1.0, row_offset=cid * g[0], col_offset=cid * g[1])
            for g, cid in zip(reference_grids, condition_ids)
        ]
    if scheme == "kontext":
        return [grid_ids(g, t=1.0) for g in reference_grids]
    if scheme == "uno":
        ids, row_offset, col_offset = [], noisy_grid[0], noisy_grid[1]
        for g in reference_grids:
            ids.append(grid_ids(g, t=0.0, row_offset=row_offset, col_offset=col_offset))
            row_offset, col_offset = row_offset + g[0], col_offset + g[1]
        return ids
    raise ValueError(f"unknown position scheme {scheme!r}; expected 'uno', 'kontext' or 'condition_id'")


def text_ids(
    scheme: PositionScheme,
    num_text_tokens: int,
    item_spans: Sequence[tuple[int, int]] | None = None,
    reference_id_grids: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Ids of the prompt tokens: zeros (FLUX), except under ``condition_id`` (One-for-All CCPA, Eq. 3),
    where the item-description tokens of reference i (the half-open span [start, end) of
    ``item_spans[i]``) take the centroid of reference i's ids: (1, mean row id, mean col id).
    ``reference_id_grids`` are reference_ids(...) for the same references. (num_text_tokens, 3)"""
    ids = torch.zeros(num_text_tokens, 3)
    if scheme != "condition_id" or not item_spans:
        return ids
    if reference_id_grids is None or len(reference_id_grids) != len(item_spans):
        raise ValueError("condition_id text ids need one item span per reference and the references' ids")
    for (start, end), ref in zip(item_spans, reference_id_grids):
        if not 0 <= start < end <= num_text_tokens:
            raise ValueError(f"item span [{start}, {end}) is outside the {num_text_tokens} prompt tokens")
        ids[start:end] = ref.mean(dim=0)
    return ids


def mask_tokens(masks: torch.Tensor, grid: GridSize) -> torch.Tensor:
    """Subject masks pooled to a packed token grid, row-major like pack_latents: each token's value is
    the fraction of its pixel patch inside the mask (area pooling, so a border token is partly in).
    masks (B, R, H, W) in [0, 1] with H, W multiples of the grid -> (B, R, rows * cols) fp32."""
    b, r, h, w = masks.shape
    rows, cols = grid
    if h % rows or w % cols:
        raise ValueError(f"mask size {h}x{w} is not a multiple of the token grid {rows}x{cols}")
    pooled = torch.nn.functional.avg_pool2d(masks.float().reshape(b * r, 1, h, w), kernel_size=(h // rows, w // cols))
    return pooled.reshape(b, r, rows * cols)
