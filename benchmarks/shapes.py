"""Job shapes by name, without importing Dagster (the report command stays light)."""


def _size(shape: str) -> int:
    return int(shape.split("_", 1)[1])


def step_count(shape: str) -> int:
    """How many steps a run of ``shape`` executes."""
    if shape.startswith("chain_"):
        return _size(shape)
    if shape.startswith("fanout_"):
        return _size(shape) + 2
    if shape == "sleepy":
        return 8
    if shape.startswith("sleepy_"):
        return _size(shape)
    if shape == "tiny":
        return 2
    if shape == "nap":
        return 1
    raise ValueError(f"Unknown job shape {shape!r}.")


def sleep_count(shape: str) -> int:
    """How many one-second naps a run of ``shape`` holds (0 for shapes without naps)."""
    if shape == "sleepy" or shape.startswith("sleepy_"):
        return step_count(shape)
    return 1 if shape == "nap" else 0
