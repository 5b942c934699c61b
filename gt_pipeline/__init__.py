"""GroundThink pipeline: the Dagster layer that wires the `data`, `kernels` and `models` libraries into assets."""
