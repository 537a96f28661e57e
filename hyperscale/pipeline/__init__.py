"""Multi-phase runs (Hyper-SD's TSCD -> feedback -> DMD into one LoRA): phase chaining,
fingerprints and the unified export, over the trainer (``hyperscale.pipeline.run``)."""
