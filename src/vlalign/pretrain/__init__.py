"""Pre-training of the tiny backbones on the world: the LM on its texts (behind soft scene
prefixes), the vision tower on per-cell attributes."""
