"""Training-side pieces: `model`, a small transformer whose every backward is written by
hand, and `checkpoint`, its recompute schedules and the memory ledger that measures them
(spec/checkpointing.md)."""
