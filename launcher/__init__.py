"""The lotus-train application: CLI, config, trainer loop, checkpoints, metrics, benchmarks."""
