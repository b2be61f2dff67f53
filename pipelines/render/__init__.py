"""Pure-NumPy renderings of volumes shared by the workers and the web console (no torch, no I/O)."""
