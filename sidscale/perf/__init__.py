"""Performance accounting: FLOPs of an iteration, MFU, the per-GPU memory plan, benchmark set-up."""
