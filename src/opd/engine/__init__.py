"""How a run is spread out: where batches are made (in step or pipelined), by which workers (this process or
Ray actors), and over how many trainer processes (torch.distributed)."""

from opd.engine.local import LocalRollout
from opd.engine.pipeline import PipelinedBatches, RolloutBackend, ScoredBatch, SyncBatches, make_batches

__all__ = ["LocalRollout", "PipelinedBatches", "RolloutBackend", "ScoredBatch", "SyncBatches", "make_batches"]
