"""Multi-process training on machines without CUDA: the one place where trl-flower works around the launch stack.

On GPU machines, and in any process that `accelerate launch` did not start with several processes, every function
here is a no-op: `accelerate launch --config_file examples/accelerate/<cfg>.yaml script.py` works as documented by
accelerate / TRL. On a CPU-only machine (CI, laptops), two launch paths are silently wrong or fail with the pinned
versions (transformers 5.23, accelerate 1.15, deepspeed 0.19.8); `prepare_cpu_distributed` repairs both before the
training config is built (docs/distributed.md has the full story):

* **DeepSpeed (ZeRO-2/3) with several processes** fails with ``AssertionError: Check batch related parameters.
  train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size``. `TrainingArguments`
  builds its `PartialState` without a backend; on a CUDA-less host accelerate resolves backend ``None``, still lets
  DeepSpeed initialise gloo with the real world size, but then records ``num_processes = 1``; the Trainer fills the
  ``"auto"`` batch fields with world size 1 while DeepSpeed sees 2. Fix: create the state first with
  ``PartialState(backend="gloo")`` (accelerate then counts every process and keeps the DEEPSPEED type) and make
  `TrainingArguments` reuse it (``accelerator_config={"use_configured_state": True}``).
* **Plain DDP** (a ``MULTI_GPU`` accelerate config such as ``examples/accelerate/ddp.yaml``) without
  ``ACCELERATE_USE_CPU=true`` runs N *independent* single-process trainings (each rank 0 of 1, no gradient
  all-reduce; transformers only warns "process group is initialized, but parallel_mode != ParallelMode.DISTRIBUTED").
  Fix: set ``ACCELERATE_USE_CPU=true`` in the process (transformers then asks accelerate for ``MULTI_CPU`` with
  gloo). ``accelerate launch --cpu`` is *not* a fix: it always starts a single process.

bf16 on CPU: `TrainingArguments` rejects ``bf16=True`` without a bf16 GPU unless ``use_cpu=True``. When bf16 is
requested on a CUDA-less host, `prepare_cpu_distributed` sets ``use_cpu=True`` (bf16 autocast on CPU; DeepSpeed
still runs through the configured state) and says so in the log.

Teardown: call `finish_distributed` at the end of a script. It waits for every rank and destroys the process group,
which avoids a rare abort of a non-zero rank at interpreter exit after a successful ZeRO-3 save.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["finish_distributed", "is_cpu_multiprocess_launch", "prepare_cpu_distributed"]


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def is_cpu_multiprocess_launch() -> bool:
    """True when this process is one of several started by a launcher (``WORLD_SIZE > 1``) on a host without CUDA."""
    if _world_size() <= 1:
        return False
    import torch

    return not torch.cuda.is_available()


def prepare_cpu_distributed(config_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Make a multi-process CPU launch train as one data-parallel job; call it *before* building the config.

    A no-op (returns a copy of `config_kwargs` unchanged) unless the process was launched with ``WORLD_SIZE > 1`` on
    a host without CUDA. Then:

    * under DeepSpeed (``ACCELERATE_USE_DEEPSPEED=true``, set by ``accelerate launch`` with a DeepSpeed config):
      creates ``PartialState(backend="gloo")`` and adds ``accelerator_config={"use_configured_state": True}`` so that
      `TrainingArguments` reuses it (the Trainer then fills DeepSpeed's ``"auto"`` batch sizes with the real world
      size);
    * otherwise (DDP): sets ``ACCELERATE_USE_CPU=true`` in this process so that transformers builds a ``MULTI_CPU``
      gloo state instead of N independent runs;
    * if ``bf16`` is requested, sets ``use_cpu=True`` (required by transformers for bf16 without a GPU).

    Only one DeepSpeed trainer can be built per process after this call (accelerate refuses a second DeepSpeed
    plugin on a configured state).

    Args:
        config_kwargs: keyword arguments for `FlowerConfig` / any `TrainingArguments` subclass (not modified).

    Returns:
        The keyword arguments to build the config with.

    Example:
        >>> kwargs = prepare_cpu_distributed({"output_dir": "out", "bf16": False})  # single process: unchanged
        >>> kwargs
        {'output_dir': 'out', 'bf16': False}
    """
    kwargs = dict(config_kwargs)
    if not is_cpu_multiprocess_launch():
        return kwargs
    if kwargs.get("bf16") and not kwargs.get("use_cpu"):
        logger.warning("bf16 requested on a host without CUDA: setting use_cpu=True (bf16 autocast on CPU)")
        kwargs["use_cpu"] = True
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        from accelerate import PartialState

        state = PartialState(backend="gloo")
        accelerator_config = kwargs.get("accelerator_config") or {}
        if not isinstance(accelerator_config, dict):  # an AcceleratorConfig object or a JSON path: keep the user's
            raise ValueError(
                "prepare_cpu_distributed needs accelerator_config as a dict (it adds use_configured_state=True); got "
                f"{type(accelerator_config).__name__}. Pass the accelerator settings as a dict."
            )
        kwargs["accelerator_config"] = {**accelerator_config, "use_configured_state": True}
        logger.info(
            "CPU DeepSpeed launch: configured gloo state, %d processes (trl_flower.distributed)", state.num_processes
        )
    else:
        os.environ["ACCELERATE_USE_CPU"] = "true"
        logger.info("CPU multi-process launch: ACCELERATE_USE_CPU=true (gloo DDP) (trl_flower.distributed)")
    return kwargs


def finish_distributed() -> None:
    """Wait for every rank, then destroy the process group (a no-op when no process group exists)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
    except Exception:  # noqa: BLE001 - a state-less group (e.g. torch.distributed directly): plain barrier
        dist.barrier()
    dist.destroy_process_group()
