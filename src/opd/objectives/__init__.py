"""Stage 5 objectives: per-token losses of the student update."""

from opd.objectives.losses import (
    forward_kl,
    generalized_jsd,
    kl_to_reference,
    pg_loss,
    reverse_kl,
    topk_kl,
)

__all__ = ["forward_kl", "generalized_jsd", "kl_to_reference", "pg_loss", "reverse_kl", "topk_kl"]
