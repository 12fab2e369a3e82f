"""The FLUX multi-reference policy: model building, reference conditioning, attention control and
LoRA / MoE-LoRA / dual-branch adapters."""
