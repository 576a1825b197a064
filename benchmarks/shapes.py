"""Job shapes by name, without importing Dagster (the report command stays light)."""


def step_count(shape: str) -> int:
    """How many steps a run of ``shape`` executes."""
    if shape.startswith("chain_"):
        return int(shape.split("_", 1)[1])
    if shape.startswith("fanout_"):
        return int(shape.split("_", 1)[1]) + 2
    if shape == "sleepy":
        return 8
    if shape == "tiny":
        return 2
    raise ValueError(f"Unknown job shape {shape!r}.")
