"""Reward models for multi-subject generation (Multi-ID faces, objects, CLIP, HPSv2), the composite
reward and the REST reward server. Never imports ``policies`` or ``rl_align``."""
