"""What runs per call: the compiled program, step/branch tracking, per-branch state and stats."""
