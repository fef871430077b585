"""Distributed loading: one pipeline stage per rank of a ``torch.distributed`` process group.

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

Modules: ``_stages`` the pure split; ``_channel`` the gloo control channel; ``_load`` the
load across ranks; ``_results`` what it delivers; ``_failure`` a rank's error as data;
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
from streamload.distributed._stages import (
    DistributedPlan,
    RankCapacity,
    Stage,
    is_input_part,
    split_stages,
    stage_spec,
)
from streamload.errors import CollectiveError, DistributedError, RankFailedError

__all__ = [
    "DEFAULT_TIMEOUT",
    "CollectiveError",
    "DistributedError",
    "DistributedEventCallback",
    "DistributedModel",
    "DistributedPlan",
    "RankCapacity",
    "RankFailedError",
    "RankSummary",
    "Stage",
    "StageAssigned",
    "is_input_part",
    "load_distributed",
    "main",
    "report_table",
    "split_stages",
    "stage_spec",
]
