"""Multi-process training on torch.distributed, launched the way RecBole launches it.

RecBole's own mode (``run_recbole(..., nproc=N)``, config keys ``nproc``, ``world_size``, ``ip``,
``port``, ``offset``) is NCCL only: its Config asserts one GPU per process, and its trainer wraps
the model in ``DistributedDataParallel(device_ids=[rank])``, which a CPU module refuses. Here:

* ``init_device(config)`` (called by our ``Config``) joins the process group with ``gloo`` when the
  run is on the CPU (no CUDA, or ``gpu_id`` empty) and leaves GPU runs to RecBole's NCCL code;
* ``CheckpointSafeMixin`` builds RecBole's DDP wrapper without ``device_ids`` on the CPU, writes
  checkpoints on rank 0 only and gives every rank rank 0's checkpoint name;
* the plugin's own training loops (the episodic trainer: one task = one user) do not use a
  DistributedSampler: every rank walks the same seeded meta-batches, takes its share
  (``shard``), and the gradients are summed over ranks (``all_reduce_gradients``), so a
  2-process run computes the 1-process run's updates (same global batch);
* ``main_process_first`` lets rank 0 train the prerequisites (ALLMRec's backbone) while the other
  ranks wait, then read its checkpoint;
* ``sharing_work`` makes chunked cache computations (text embeddings, LLM judgements) split their
  chunks over the ranks: each computes its share, then all read the whole
  (``recbole_llm.llm.cache.Cache.chunked``);
* ``spawn`` starts ``nproc`` processes on this machine and returns rank 0's result.
"""
import contextlib
import socket

import torch
import torch.distributed as dist


def is_distributed(config):
    return not config["single_spec"]


def rank_and_world(config):
    """``(rank, world size)``; ``(0, 1)`` in a single process."""
    if not is_distributed(config):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main(config):
    return rank_and_world(config)[0] == 0


def uses_cpu_backend(config):
    gpu_id = config["gpu_id"]  # may arrive as the int 0 from yaml or --gpu_id=0: that is GPU 0
    return not torch.cuda.is_available() or gpu_id is None or str(gpu_id).strip() == ""


def init_device(config):
    """Join the gloo process group for a CPU run started with ``local_rank``; ``True`` if done
    here (RecBole's NCCL code handles GPU runs)."""
    values = config.final_config_dict
    if "local_rank" not in values:
        return False
    if not uses_cpu_backend(values):
        gpus = str(values["gpu_id"]).split(",")
        if int(values.get("nproc") or 1) > len(gpus):  # RecBole would stop on a bare assert
            raise ValueError(f"nproc={values['nproc']} processes need one GPU each, gpu_id={values['gpu_id']!r} "
                             "names fewer: name more GPUs, or set gpu_id='' to run the processes on the CPU")
        return False
    rank = int(values["local_rank"]) + int(values.get("offset") or 0)
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", rank=rank, world_size=int(values["world_size"]),
                                init_method=f"tcp://{values['ip']}:{values['port']}")
    values["device"] = torch.device("cpu")
    values["single_spec"] = False
    if rank != 0:  # RecBole's rule: only rank 0 logs and shows progress
        values["state"] = "error"
        values["show_progress"] = False
        values["verbose"] = False
    return True


@contextlib.contextmanager
def single_process_view(config):
    """Inside, ``config["single_spec"]`` reads True: for RecBole code that would otherwise add a
    DistributedSampler or a GPU-only DDP wrapper."""
    before = config["single_spec"]
    config["single_spec"] = True
    try:
        yield
    finally:
        config["single_spec"] = before


@contextlib.contextmanager
def main_process_first(config):
    """Rank 0 runs the block first (and writes the caches); the others run it after, reading them."""
    distributed = is_distributed(config)
    if distributed and not is_main(config):
        dist.barrier()
    yield
    if distributed and is_main(config):
        dist.barrier()


_WORK_GROUP = None  # (rank, world) while ``sharing_work`` is active


@contextlib.contextmanager
def sharing_work(config):
    """Inside, ``work_group()`` gives ``(rank, world)`` in a multi-process run, so that chunked
    cache computations split their chunks over the ranks. Every rank must run the same
    computations in the same order (each one ends with barriers)."""
    global _WORK_GROUP
    before = _WORK_GROUP
    _WORK_GROUP = rank_and_world(config) if is_distributed(config) else None
    try:
        yield
    finally:
        _WORK_GROUP = before


def work_group():
    """``(rank, world)`` inside ``sharing_work`` of a multi-process run, else None."""
    return _WORK_GROUP


def shard(items, config):
    """This rank's share of a list: every ``world``-th item from ``rank``."""
    rank, world = rank_and_world(config)
    return items[rank::world]


def broadcast_parameters(model, config):
    """Rank 0's trainable weights on every rank (RecBole seeds rank r with ``seed + r``; frozen
    weights are loaded from the same files on every rank)."""
    if is_distributed(config):
        for parameter in model.parameters():
            if parameter.requires_grad:
                dist.broadcast(parameter.data, src=0)


def all_reduce_gradients(parameters, config):
    """Sum every gradient over the ranks (each rank already divided by the global batch size)."""
    if is_distributed(config):
        for parameter in parameters:
            if parameter.requires_grad:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
                dist.all_reduce(parameter.grad)


def all_reduce_sum(value, config):
    """The sum of a Python float over the ranks."""
    if not is_distributed(config):
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item())


def gather(objects, config):
    """Every rank's list, concatenated in rank order (picklable objects)."""
    if not is_distributed(config):
        return objects
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, objects)
    return [item for part in parts for item in part]


def broadcast_object(value, config):
    """Rank 0's value on every rank."""
    if not is_distributed(config):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(config=None):
    """Wait for every rank (a no-op in one process); ``config=None``: the group of ``sharing_work``."""
    if (is_distributed(config) if config is not None else _WORK_GROUP is not None):
        dist.barrier()


def free_port():
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return str(probe.getsockname()[1])


def spawn(function, nproc, kwargs, world_size=-1, ip="localhost", port=None, group_offset=0):
    """Run ``function(**kwargs)`` in ``nproc`` processes on this machine (ranks ``group_offset`` +
    0..nproc-1 of ``world_size``, RecBole's ``run_recbole`` arguments) and return rank 0's result.
    ``kwargs["config_dict"]`` gets the distributed keys; ``port`` defaults to a free one."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    config_dict = dict(kwargs.get("config_dict") or {})
    config_dict.update({"world_size": nproc if world_size == -1 else world_size, "ip": ip,
                        "port": port or free_port(), "nproc": nproc, "offset": group_offset})
    mp.spawn(_run_rank, args=(function, {**kwargs, "config_dict": config_dict}, queue), nprocs=nproc, join=True)
    return queue.get() if not queue.empty() else None


def _run_rank(rank, function, kwargs, queue):
    kwargs = {**kwargs, "config_dict": {**kwargs["config_dict"], "local_rank": rank}}
    result = function(**kwargs)
    if rank == 0:
        queue.put(result)
