"""IDs as dockerd sends them, made from a short readable label: the wire refuses anything else."""

import hashlib


def docker_id(label: str) -> str:
    """A 64-lowercase-hex ID (dockerd's stringid shape), the same for the same label."""
    return hashlib.sha256(label.encode()).hexdigest()
