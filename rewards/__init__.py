"""Reward models for multi-subject generation (Multi-ID faces, objects, CLIP, HPSv2, weight-free
signals), the composite reward, Hungarian matching and the REST reward server with its client.
Never imports ``policies`` or ``rl_align``; heavy backends (torch, dlib, insightface, open_clip,
transformers) are imported only by the components that use them."""

from rewards.composite import CompositeReward, build_reward, reward_info, weighted_sum
from rewards.config import PRESETS, RewardConfig
from rewards.matching import (
    cosine_similarity_matrix,
    distance_similarity_matrix,
    hungarian_match_score,
    matched_similarity_sum,
)
from rewards.types import (
    InputError,
    ReferenceSubject,
    RewardModel,
    RewardResult,
    ScoreBatch,
    Scorer,
)

__all__ = [
    "CompositeReward",
    "InputError",
    "PRESETS",
    "ReferenceSubject",
    "RewardConfig",
    "RewardModel",
    "RewardResult",
    "ScoreBatch",
    "Scorer",
    "build_reward",
    "cosine_similarity_matrix",
    "distance_similarity_matrix",
    "hungarian_match_score",
    "matched_similarity_sum",
    "reward_info",
    "weighted_sum",
]
