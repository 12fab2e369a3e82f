"""Latent packing and position ids against diffusers and the hand-written formulas of UNO, FLUX.1 Kontext
and One-for-All (Eq. 2-3)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

from policies.ids import grid_ids, mask_tokens, pack_latents, reference_ids, text_ids, unpack_latents


def test_packing_matches_diffusers_and_round_trips():
    latents = torch.randn(2, 12, 6, 8, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 12, 6, 8), rtol=0, atol=0)
    assert torch.equal(unpack_latents(packed, (3, 4)), latents)


def test_noisy_grid_ids_match_diffusers():
    expected = FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32)
    assert torch.equal(grid_ids((3, 4)), expected)


def test_mask_tokens_are_row_major_like_pack_latents_on_a_non_square_grid():
    """Guards the token order of mask_tokens: row-major as pack_latents, not column-major. A 2 x 3 token
    grid of 2 x 2-pixel patches, with masks covering off-diagonal patches (a transpose moves them)."""
    masks = torch.zeros(1, 2, 4, 6)
    masks[0, 0, 0:2, 4:6] = 1.0  # all of token (0, 2)
    masks[0, 0, 2:4, 0:1] = 1.0  # left half of token (1, 0)
    masks[0, 1, 2:4, 2:4] = 1.0  # all of token (1, 1)
    masks[0, 1, 0:1, 2:4] = 1.0  # top half of token (0, 1)
    tokens = mask_tokens(masks, (2, 3))
    expected = torch.tensor([[[0.0, 0.0, 1.0, 0.5, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0, 1.0, 0.0]]])
    assert torch.equal(tokens, expected)
    # a mask is a 1-channel latent: the mean of a token's 4 packed channels is its 2 x 2 patch's area
    packed = pack_latents(masks.reshape(2, 1, 4, 6)).mean(dim=-1).reshape(1, 2, 6)
    torch.testing.assert_close(tokens, packed, rtol=0, atol=0)


def _ids_by_hand(t, rows, cols, row_offset, col_offset):
    return torch.tensor([[t, row_offset + r, col_offset + c] for r in range(rows) for c in range(cols)], dtype=torch.float32)


def test_uno_ids_are_diagonal_offsets_after_the_target():
    noisy, grids = (4, 5), [(2, 3), (3, 2)]
    ids = reference_ids("uno", noisy, grids)
    assert torch.equal(ids[0], _ids_by_hand(0, 2, 3, 4, 5))  # starts at (H, W)
    assert torch.equal(ids[1], _ids_by_hand(0, 3, 2, 4 + 2, 5 + 3))  # then after reference 0


def test_kontext_ids_have_first_axis_one_and_no_offset():
    ids = reference_ids("kontext", (4, 5), [(2, 3), (3, 2)])
    assert torch.equal(ids[0], _ids_by_hand(1, 2, 3, 0, 0))
    assert torch.equal(ids[1], _ids_by_hand(1, 3, 2, 0, 0))


def test_condition_id_ids_follow_one_for_all_eq2_and_text_centroids_eq3():
    grids, categories = [(2, 3), (4, 2)], [1, 3]  # face, lower garment
    ids = reference_ids("condition_id", (4, 5), grids, categories)
    assert torch.equal(ids[0], _ids_by_hand(1, 2, 3, 1 * 2, 1 * 3))  # (1, r + ID h_ref, c + ID w_ref)
    assert torch.equal(ids[1], _ids_by_hand(1, 4, 2, 3 * 4, 3 * 2))
    text = text_ids("condition_id", 10, [(2, 4), (6, 9)], ids)
    # centroid of reference 0: rows 2..3 -> 2.5, cols 3..5 -> 4; reference 1: rows 12..15 -> 13.5, cols 6..7 -> 6.5
    expected = torch.zeros(10, 3)
    expected[2:4] = torch.tensor([1.0, 2.5, 4.0])
    expected[6:9] = torch.tensor([1.0, 13.5, 6.5])
    assert torch.equal(text, expected)
    assert torch.equal(text_ids("uno", 10, [(2, 4)], ids[:1]), torch.zeros(10, 3))


def test_id_errors_name_what_is_missing():
    with pytest.raises(ValueError, match="condition id per reference"):
        reference_ids("condition_id", (4, 4), [(2, 2)])
    with pytest.raises(ValueError, match="outside the 5 prompt tokens"):
        text_ids("condition_id", 5, [(3, 7)], reference_ids("condition_id", (4, 4), [(2, 2)], [1]))
    with pytest.raises(ValueError, match="unknown position scheme"):
        reference_ids("diagonal", (4, 4), [(2, 2)])
