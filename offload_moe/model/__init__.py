"""Architecture facts read from the transformers model built on the meta device, and building it."""
