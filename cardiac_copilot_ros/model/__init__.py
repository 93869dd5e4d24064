"""Models: encoder E, guidance head G, Cardiac Dreamer I, torch pose algebra, bundles, export.

See docs/TRAINING.md. Submodules import torch; import them directly
(``from cardiac_copilot_ros.model.bundle import load_bundle``).
"""
