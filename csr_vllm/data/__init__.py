"""Real text and task data, installed from package registries (never from a hub at run time)."""
