"""Distributed loading: pipeline stages over the ranks of a ``torch.distributed`` process
group, each stage one rank or, with ``tensor_parallel_size=N``, N consecutive ranks that each
load their slice of the stage's split tensors.

    import torch.distributed as dist
    from streamload.distributed import load_distributed

    dist.init_process_group("nccl")          # or "gloo"; torchrun sets RANK, WORLD_SIZE, ...
    model = await load_distributed("path/to/checkpoint", streamload.LoadParams(devices=[...]))
    model.tensors                            # this rank's stage, each tensor on its device

Every rank calls ``load_distributed`` with the same checkpoint (a shared file system or a copy
per node) and the same parameters, apart from ``params.devices``, which name the rank's own
devices. What the ranks agree on, and what each decides alone:

1. *Survey* (collective). Each rank reads the checkpoint's headers, probes its devices and
   sends its capacities (``all_gather_object``), with a fingerprint of the checkpoint and of
   its parameters: a rank that sees another checkpoint, other settings, or cannot read or
   probe at all makes every rank fail alike.
2. *Split* (rank 0, broadcast with ``broadcast_object_list``). ``split_stages`` cuts the layers
   into contiguous stages, one per rank in rank order, balanced by the ranks' GPU capacities,
   and forecasts each rank's local plan with the usual planner. The first stage also holds the
   input-side parts (embeddings, vision/audio towers and projectors), the last stage the
   output-side parts (final norm, lm_head, pooler, extra layers such as MTP heads); a head tied
   to the input embedding makes the last stage load the embedding tensor too. Every rank gets
   the same ``DistributedPlan``, or the same error.
3. *Load* (local). Each rank streams its stage's tensors with the engine onto its own devices
   (``stage_spec``: the stage as a ``ModelSpec`` of its own). Rechecks, re-plans after
   under-delivery and OOM, and the paged-attention fallback happen inside the rank, over its
   devices only; its layer indices count from the stage's first layer.
   With ``tensor_parallel_size=N``, the stages are groups of N consecutive ranks, and each
   rank of a group loads part ``tp_rank`` of every tensor the TP plan splits (``_tp``: module
   globs -> ``colwise`` / ``rowwise`` / ``vocab`` / ``replicate``; the model's transformers
   plan by default) and the whole of every other one. A part along dim 0 is read as one byte
   range, along a later dimension as a strided read (one ``preadv`` per run of rows with a
   vector of the rows' pieces); the bytes placed are exactly the part's, and the planner
   charges each rank its parts, its share of the KV heads and of the activations (``_slices``).
   The split is resolved by every rank on its own after the survey agreed on the checkpoint
   and settings, so a plan that cannot split raises the same ``PlanError`` on every rank
   before any tensor byte is read.
4. *Outcome* (collective). The ranks exchange a summary, or the error that stopped them. If
   any rank failed, every rank releases what it placed and raises the same ``RankFailedError``
   naming the first failed rank, its host and device.

Collectives run in worker threads (``anyio.to_thread.run_sync``), so the event loop never
blocks; they use a gloo group made for the load (``peer_timeout`` seconds per exchange), so a
dead peer (its sockets close) fails the others at once and a hung peer within
``peer_timeout``. Layer placements are logged by the engine as usual; ``structlog`` context
variables carry ``rank`` (merged into log lines by the default structlog configuration).

Errors (defined in ``streamload.errors``, re-exported here)::

    StreamloadError
    └── DistributedError        a distributed load failed (``rank``, ``host``, ``device``)
        ├── RankFailedError     a rank could not survey, plan or load its stage: raised on every
        │                       rank with the same message
        └── CollectiveError     an exchange did not complete: a peer died, hung past
                                ``peer_timeout``, or the process group is unusable

The package is also a command (run under ``torchrun``)::

    torchrun --nproc-per-node 2 -m streamload.distributed load PATH [--device sim:0=24GiB ...]
    torchrun --nproc-per-node 4 -m streamload.distributed load PATH --tensor-parallel-size 2

Modules: ``_stages`` the pure split; ``_tp`` the tensor-parallel plan; ``_slices`` a rank's
slices and its share of the model; ``_channel`` the gloo control channel; ``_load`` the load
across ranks; ``_results`` what it delivers; ``_failure`` a rank's error as data;
``_command`` the ``torchrun`` command. This face re-exports the public names.
"""

from streamload.distributed._channel import DEFAULT_TIMEOUT
from streamload.distributed._command import main, report_table
from streamload.distributed._load import load_distributed
from streamload.distributed._results import (
    DistributedEventCallback,
    DistributedModel,
    RankSummary,
    StageAssigned,
)
from streamload.distributed._slices import shard_spec, slice_entry
from streamload.distributed._stages import (
    DistributedPlan,
    RankCapacity,
    Stage,
    is_input_part,
    split_stages,
    stage_spec,
)
from streamload.distributed._tp import (
    BUILTIN_PLANS,
    Shard,
    TensorParallel,
    default_tp_plan,
    resolve_tp,
)
from streamload.errors import CollectiveError, DistributedError, RankFailedError

__all__ = [
    "BUILTIN_PLANS",
    "DEFAULT_TIMEOUT",
    "CollectiveError",
    "DistributedError",
    "DistributedEventCallback",
    "DistributedModel",
    "DistributedPlan",
    "RankCapacity",
    "RankFailedError",
    "RankSummary",
    "Shard",
    "Stage",
    "StageAssigned",
    "TensorParallel",
    "default_tp_plan",
    "is_input_part",
    "load_distributed",
    "main",
    "report_table",
    "resolve_tp",
    "shard_spec",
    "slice_entry",
    "split_stages",
    "stage_spec",
]
