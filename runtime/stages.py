"""The one place that knows the fibrosis stage names and their order."""

STAGES: tuple[str, ...] = ("A", "B", "C")
STAGE_NAMES: dict[str, str] = {"A": "early", "B": "middle", "C": "last"}
NUM_STAGES = len(STAGES)


def stage_index(label: str) -> int:
    """Index of a stage label ('A'/'B'/'C', case-insensitive); ValueError naming the label otherwise."""
    key = str(label).strip().upper()
    if key not in STAGES:
        raise ValueError(f"unknown stage label {label!r} (expected one of {', '.join(STAGES)})")
    return STAGES.index(key)
