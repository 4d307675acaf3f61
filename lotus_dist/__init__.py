"""lotus-dist: the Lotus low-rank optimizer and the pieces to pre-train LLaMA with it."""
