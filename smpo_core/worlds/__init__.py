"""Synthetic worlds: data and models smpo builds itself, in the real formats, so that every
stage runs with no hub access. Production code of the offline profiles, not test helpers:
settings name them as `builtin:NAME` (builtins.py), and the stages load them through the
same Parquet / `from_pretrained` / checkpoint code as the real ones.

- tiny.py: the `tiny` profile's world: drawn scenes as Pick-a-Pic pairs, small random SD,
  SDXL and CLIP models.
- checkpoints.py: small random reward models in the HPSv2, ImageReward and LAION-aesthetic
  file formats.
"""
