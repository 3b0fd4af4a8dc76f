"""`system.strategy=fsdp`: FSDP2 (torch's `fully_shard`), one shard group per transformer block.

Lightning's ModelParallelStrategy runs FSDP2, whose parameters are DTensors sharded over a device mesh,
and leaves the sharding to the LightningModule's `configure_model`, which calls `shard`. This strategy
makes the mesh pure data parallel over every process (no tensor parallelism). Unlike the FSDP1 wrapper,
FSDP2 also runs on CPU with gloo, which is how the tests check it against a single process.
Checkpoints are full state dicts gathered on rank 0 (not per-rank shards), so `crate export` and
`crate eval` read them like DDP's, and they resume under FSDP with any number of processes. The optimizer
state is keyed by parameter order rather than by param group, so `check_resume` refuses to resume across
FSDP and the other strategies.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh

from crate.model import LanguageModel


class FSDPStrategy(ModelParallelStrategy):
    """FSDP2 data parallelism over all processes of all nodes, with full (rank-0) checkpoints."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(save_distributed_checkpoint=False, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def shard(model: LanguageModel, mesh: DeviceMesh) -> None:
    """Shard each block on its own (gathered just before it runs, freed after), then the rest at the root."""
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
