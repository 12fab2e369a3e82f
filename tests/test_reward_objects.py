"""The object pipeline (Florence-2 grounding -> SAM2 box mask -> DINOv2 embedding -> Hungarian) on tiny
random-init models built from transformers configs, saved to folders and loaded back the way real
weights are, plus the box/crop helpers against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BartConfig,
    BitImageProcessor,
    CLIPImageProcessor,
    Dinov2Config,
    Dinov2Model,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    PreTrainedTokenizerFast,
    Sam2Config,
    Sam2HieraDetConfig,
    Sam2ImageProcessor,
    Sam2MaskDecoderConfig,
    Sam2Model,
    Sam2Processor,
    Sam2PromptEncoderConfig,
    Sam2VisionConfig,
)

from rewards import ReferenceSubject, RewardConfig, ScoreBatch, build_reward
from rewards.objects import (
    Dinov2Embedder,
    FlorenceGrounder,
    ObjectEmbedder,
    Sam2BoxSegmenter,
    box_iou,
    dedupe_boxes,
    masked_crop,
)
from rl_align.core.config import load_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


TAUGHT_ANSWER = "apple<loc_100><loc_200><loc_500><loc_900>"  # one phrase, one box (in 1000ths of W, H)


def _teach_one_answer(model, processor) -> None:
    """A few decoder steps so the random-init model answers every grounding prompt with TAUGHT_ANSWER:
    generation then yields a real box, and the rest of the pipeline runs on it."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    inputs = processor(text=["<CAPTION_TO_PHRASE_GROUNDING>a red apple"], images=[image], return_tensors="pt")
    target = processor.tokenizer(TAUGHT_ANSWER, add_special_tokens=False, return_tensors="pt").input_ids
    labels = torch.cat([target, torch.tensor([[processor.tokenizer.eos_token_id]])], dim=1)
    for name, param in model.named_parameters():  # no backward through the vision tower: seconds, not tens
        param.requires_grad_("decoder" in name or "lm_head" in name)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(40):
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _save_tiny_florence(folder) -> None:
    """Florence-2 with a byte-level tokenizer (every byte a token, plus <loc_0..999>) built in memory."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    backend = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(specials + alphabet)}, merges=[], unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.add_tokens([f"<loc_{i}>" for i in range(1000)])
    image_processor = CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)
    image_processor.image_seq_length = 17  # (32 / 4 / 2)^2 spatial tokens + 1 pooled
    processor = Florence2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        post_processor_config={"phrase_grounding": {"banned_grounding_tokens": ["the image"]}},
    )
    vision = dict(
        depths=[1, 1],
        patch_size=[7, 3],
        patch_stride=[4, 2],
        patch_padding=[3, 1],
        patch_prenorm=[False, True],
        embed_dim=[16, 32],
        num_heads=[1, 2],
        num_groups=[1, 2],
        window_size=2,
        projection_dim=32,
        max_position_embeddings=16,
        max_temporal_embeddings=4,
    )
    text = BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(
        Florence2Config(vision_config=vision, text_config=text.to_dict(), image_token_id=tokenizer.image_token_id)
    )
    _teach_one_answer(model, processor)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _save_tiny_sam2(folder, size: int = 128) -> None:
    backbone = Sam2HieraDetConfig(
        hidden_size=12,
        image_size=size,
        patch_stride=4,
        patch_kernel_size=7,
        patch_padding=3,
        blocks_per_stage=[1, 1, 1, 1],
        embed_dim_per_stage=[12, 24, 48, 96],
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=[96, 48, 24, 12],
        backbone_feature_sizes=[[size // 4] * 2, [size // 8] * 2, [size // 16] * 2],
        fpn_hidden_size=32,
    )
    config = Sam2Config(
        vision_config=vision,
        prompt_encoder_config=Sam2PromptEncoderConfig(
            image_size=size, patch_size=16, mask_input_channels=8, hidden_size=32
        ),
        mask_decoder_config=Sam2MaskDecoderConfig(
            hidden_size=32,
            hidden_act="relu",
            mlp_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            iou_head_hidden_dim=32,
        ),
        memory_attention_hidden_size=12,
        memory_encoder_hidden_size=32,
        image_size=size,
        mask_downsampler_embed_dim=32,
        memory_fuser_embed_dim=32,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=32,
    )
    torch.manual_seed(1)
    Sam2Model(config).save_pretrained(folder)
    Sam2Processor(
        image_processor=Sam2ImageProcessor(
            size={"height": size, "width": size}, mask_size={"height": size // 4, "width": size // 4}
        )
    ).save_pretrained(folder)


def _save_tiny_dinov2(folder) -> None:
    torch.manual_seed(2)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14
    )
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("object_models")
    _save_tiny_florence(root / "florence")
    _save_tiny_sam2(root / "sam2")
    _save_tiny_dinov2(root / "dinov2")
    return root


@pytest.fixture(scope="module")
def embedder(model_dirs):
    cfg = load_config(
        RewardConfig,
        None,
        [
            f"object.florence_dir={model_dirs / 'florence'}",
            f"object.sam2_dir={model_dirs / 'sam2'}",
            f"object.dinov2_dir={model_dirs / 'dinov2'}",
            "object.max_new_tokens=12",
        ],
    )
    return ObjectEmbedder.from_config(cfg.object, "cpu")


def _image(seed, height=60, width=80):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_box_iou_matches_pixel_counting():
    rng = np.random.default_rng(0)

    def random_boxes(n):
        corners = rng.integers(0, 20, size=(n, 2, 2))
        return np.concatenate([corners.min(1), corners.max(1)], axis=1).astype(np.float64)  # (n, 4), maybe empty

    a, b = random_boxes(6), random_boxes(5)

    def raster(box):
        grid = np.zeros((20, 20), bool)
        grid[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])] = True
        return grid

    expected = np.zeros((6, 5))
    for i in range(6):
        for j in range(5):
            union = (raster(a[i]) | raster(b[j])).sum()
            expected[i, j] = (raster(a[i]) & raster(b[j])).sum() / union if union else 0.0
    np.testing.assert_allclose(box_iou(a, b), expected, atol=1e-12)


def test_dedupe_keeps_the_first_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9.5], [20, 20, 30, 30], [0, 0, 10, 10], [1, 0, 11, 10]], dtype=float)
    np.testing.assert_array_equal(dedupe_boxes(boxes, 0.9), [0, 2, 4])  # box 4 overlaps box 0 with IoU 9/11
    np.testing.assert_array_equal(dedupe_boxes(boxes, 0.8), [0, 2])
    assert len(dedupe_boxes(np.zeros((0, 4)), 0.9)) == 0


def test_masked_crop_blacks_out_the_background():
    image = _image(1)
    mask = np.zeros(image.shape[:2], bool)
    mask[10:20, 15:30] = True
    crop = masked_crop(image, np.array([12.4, 8.0, 33.2, 22.0]), mask)
    assert crop.shape == (14, 22, 3)  # rows 8..21, columns 12..33 (floor / ceil of the box)
    np.testing.assert_array_equal(crop[2:12, 3:18], image[10:20, 15:30])
    assert crop[0].max() == 0 and crop[:, 0].max() == 0 and crop[-1].max() == 0
    assert masked_crop(image, np.array([79.5, 59.5, 80.0, 60.0]), mask).shape == (1, 1, 3)  # never empty


@pytest.mark.slow  # builds, teaches and loads three models (seconds)
def test_florence_grounding_parses_location_tokens_to_pixel_boxes(embedder):
    grounder: FlorenceGrounder = embedder.grounder
    text = "</s><s>a red apple<loc_100><loc_200><loc_500><loc_900>a dog<loc_0><loc_0><loc_999><loc_999></s>"
    boxes = grounder.boxes_from_text(text, width=64, height=48)
    # Florence-2 quantizes coordinates into 1000 bins: pixel = (bin + 0.5) * size / 1000.
    expected = [
        [(100.5) * 0.064, 200.5 * 0.048, 500.5 * 0.064, 900.5 * 0.048],
        [0.5 * 0.064, 0.5 * 0.048, 999.5 * 0.064, 999.5 * 0.048],
    ]
    np.testing.assert_allclose(boxes, expected, atol=1.0)
    assert len(grounder.boxes_from_text("</s><s></s>", 64, 48)) == 0


@pytest.mark.slow  # builds, teaches and loads three models (seconds)
def test_florence_generation_grounds_each_caption(embedder):
    boxes = embedder.grounder.ground(_image(2), ["a red apple", "a blue cup"])  # one generation per caption
    expected = [100.5 * 0.08, 200.5 * 0.06, 500.5 * 0.08, 900.5 * 0.06]  # TAUGHT_ANSWER on an 80 x 60 image
    np.testing.assert_allclose(boxes, [expected, expected], atol=1.0)


@pytest.mark.slow  # builds, teaches and loads three models (seconds)
def test_sam2_masks_one_per_box(embedder):
    segmenter: Sam2BoxSegmenter = embedder.segmenter
    masks = segmenter.masks(_image(3), np.array([[10.0, 10, 40, 50], [30, 5, 70, 55]]))
    assert masks.shape == (2, 60, 80) and masks.dtype == bool
    assert segmenter.masks(_image(3), np.zeros((0, 4))).shape == (0, 60, 80)


@pytest.mark.slow  # builds, teaches and loads three models (seconds)
def test_dinov2_embeddings_are_deterministic_and_batch_invariant(embedder):
    dino: Dinov2Embedder = embedder.embedder
    images = [_image(4), _image(5, 40, 30)]
    batch = dino.embed(images)
    assert batch.shape == (2, 32)
    np.testing.assert_allclose(dino.embed(images[1:]), batch[1:], atol=1e-5)
    assert not np.allclose(batch[0], batch[1])


class _FixedBoxes:
    """Stands in for Florence-2 only (it cannot ground anything with random weights), so that SAM2 ->
    DINOv2 -> matching run on known boxes."""

    def __init__(self, boxes):
        self.boxes = np.asarray(boxes, dtype=np.float64)

    def ground(self, image, captions):
        return self.boxes


@pytest.mark.slow  # builds, teaches and loads three models (seconds)
def test_one_object_grounded_by_two_captions_is_one_candidate(embedder):
    duplicate = ObjectEmbedder(
        _FixedBoxes([[10, 10, 40, 40], [10, 10, 40, 41]]), embedder.segmenter, embedder.embedder, 0.9
    )
    assert duplicate.embed_candidates(_image(6), ["a cup", "a mug"]).shape == (1, 32)
    two = ObjectEmbedder(_FixedBoxes([[10, 10, 40, 40], [45, 10, 75, 50]]), embedder.segmenter, embedder.embedder, 0.9)
    candidates = two.embed_candidates(_image(6), ["a cup", "a mug"])
    assert candidates.shape == (2, 32)
    refs = np.stack([embedder.embed_reference(ReferenceSubject(_image(s), "object", "x"), "r") for s in (7, 8)])
    sim = two.similarity(refs, candidates)
    assert sim.shape == (2, 2) and np.all(np.abs(sim) <= 1 + 1e-9)


@pytest.mark.slow  # builds, teaches and loads three models (seconds)
def test_multi_object_reward_from_config_end_to_end(model_dirs):
    cfg = load_config(
        RewardConfig,
        None,
        [
            "weights.id=1",
            "id_kinds=[object]",
            f"object.florence_dir={model_dirs / 'florence'}",
            f"object.sam2_dir={model_dirs / 'sam2'}",
            f"object.dinov2_dir={model_dirs / 'dinov2'}",
            "object.max_new_tokens=12",
        ],
    )
    reward = build_reward(cfg)
    refs = [
        ReferenceSubject(_image(10, 32, 32), "object", "a red apple"),
        ReferenceSubject(_image(11, 32, 32), "object", "a cup"),
    ]
    images = [_image(12), _image(13)]
    result = reward.score(ScoreBatch(images, ["an apple and a cup"] * 2, [refs, refs[:1]]))

    # Independent composition of the stages: both captions ground the same box, so there is one
    # candidate, and the best reference can claim it: R = max_k max(cos(ref_k, candidate), 0) / N_ref.
    object_embedder = reward.scorers["id"].embedders["object"]
    ref_embeddings = object_embedder.embedder.embed([r.image for r in refs])
    expected = []
    for image, n_ref in zip(images, (2, 1)):
        box = object_embedder.grounder.ground(image, ["a cup"])
        mask = object_embedder.segmenter.masks(image, box)[0]
        candidate = object_embedder.embedder.embed([masked_crop(image, box[0], mask)])[0]
        cosines = (
            ref_embeddings[:n_ref]
            @ candidate
            / np.linalg.norm(ref_embeddings[:n_ref], axis=1)
            / np.linalg.norm(candidate)
        )
        expected.append(max(cosines.max(), 0.0) / n_ref)
    np.testing.assert_allclose(result.components["id"], expected, atol=1e-6)
    assert result.components["id"][0] <= 0.5 + 1e-9  # one object can satisfy only one of two references
