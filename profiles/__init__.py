"""YAML data: the model catalogue and the hardware profiles (read with importlib.resources)."""
