"""Running jobs on a Dask cluster: ``AsyncArrowQuantV2(cluster=client_or_address)``.

Only :mod:`arrow_quant_v2.aio` imports this package, and only when a cluster is given;
``distributed`` (the ``cluster`` extra) is imported here, lazily, and nowhere else.

What crosses the network, and how:

* a job is one call of the engine (``quantize_model`` or ``validate_store``) submitted to a
  worker the client chose (see :class:`~arrow_quant_v2.cluster.runner.WorkerSlots` for the
  per-worker job and byte bounds); paths are made absolute first, so they must name the
  same files on every worker (a shared file system);
* progress: the worker throttles its events exactly as a local job does and logs the admitted
  ones on a topic of the scheduler's event log; the client's handler hands them to the
  caller's loop, where the job's usual progress channel delivers them in order;
* cancellation: a named ``distributed.Event`` per job; a watcher thread on the worker sets the
  engine's ordinary cancel token when it is set (or when the scheduler is unreachable);
* faults: a worker that dies mid-job has its task rerun elsewhere by the scheduler; a
  scheduler that disappears, or a task that killed too many workers, raises
  :class:`~arrow_quant_v2.errors.ClusterError`.
"""
from .remote import WORKER_CONFIG
from .runner import ClusterRunner, connect_client

__all__ = ["WORKER_CONFIG", "ClusterRunner", "connect_client"]
