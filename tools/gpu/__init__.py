"""GPU-lab tools: compile check, Triton cache, stand-in driver, launch-everything (not installed)."""
