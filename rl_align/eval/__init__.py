"""Evaluation and generation: images from a policy with reference subjects (``generation``), the
MultiCrafter Table 1 metrics over a benchmark manifest (``evaluate``), and benchmark manifests built from
folders of face or object images (``benchmark``). Sits above the trainers: may import core and ippo (the
task format and task conditioning), never the other way round."""
