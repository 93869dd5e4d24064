"""Training: config and presets (:mod:`.config`), loop with AMP/DDP (:mod:`.loop`), ``train`` CLI
(:mod:`.cli`), ``bench train`` (:mod:`.bench`). See docs/TRAINING.md.
"""
