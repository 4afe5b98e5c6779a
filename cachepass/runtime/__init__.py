"""What runs per call: the compiled program, step/stream tracking, per-stream state and stats."""
