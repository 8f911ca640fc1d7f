"""The flowc standard library: GPUs, interconnects, models and SLO presets, written in .flow."""
