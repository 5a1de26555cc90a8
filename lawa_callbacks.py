"""Online LAWA inside HF Trainer and Lightning: callbacks that drive a ``LawaScheduler`` from the trainer's hooks.

HF Trainer (transformers)::

    from lawa_callbacks import LawaTrainerCallback

    trainer = Trainer(model=model, args=TrainingArguments("out", eval_strategy="epoch", save_strategy="epoch"),
                      train_dataset=train, eval_dataset=val)
    lawa = LawaTrainerCallback(trainer, k=6)     # registers itself; snapshots at every epoch end
    trainer.train()                              # logs eval_lawa_loss beside eval_loss; writes out/lawa/

Lightning::

    from lawa_callbacks import LawaLightningCallback

    trainer = L.Trainer(max_epochs=90, callbacks=[LawaLightningCallback(k=6), ModelCheckpoint(save_top_k=-1)])
    trainer.fit(module, train_loader, val_loader)   # logs val_lawa_loss beside val_loss; writes lawa.ckpt

Both keep the trainer's checkpoints as they are (live weights: the trajectory stays whole for a post-hoc
``lawa sweep``), resume the window with the run, expose the ``LawaScheduler`` they drive as ``.scheduler``, and
pass ``params`` / ``shard`` / ``device`` through to it (see ``lawa_scheduler`` for what they do).

Neither transformers nor Lightning is imported by ``import lawa_callbacks``: each class is built on first use
(``from lawa_callbacks import LawaTrainerCallback`` imports transformers then), so a machine with only one of
them installed can use that one, and asking for the other gives a LawaError naming the missing package.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lawa_scheduler import LawaScheduler, ParamFilter
from lawa_tidy import LawaError

# The two classes come from the module's __getattr__ (built on first use, on the framework's base class).
__all__ = ["LawaLightningCallback", "LawaTrainerCallback", "STATE_FILE"]  # noqa: F822

STATE_FILE = "lawa_state.safetensors"  # beside the Trainer's files in every checkpoint-N/ (rank files if sharded)


def _state_file(scheduler: LawaScheduler) -> str:
    if not scheduler.shard:
        return STATE_FILE
    info = scheduler.state_dict()["shard"]
    return f"lawa_state-rank{info['rank']}-of-{info['world_size']}.safetensors"


def _publish_dir(build: Callable[[Path], None], final: Path) -> None:
    """Build a directory under a temporary name beside ``final`` and rename it into place (replacing an old one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = final.with_name(f".{final.name}.tmp{os.getpid()}"), final.with_name(f".{final.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------
# HF Trainer
# ------------------------------------------------------------------------------------------------------


class _TrainerHooks:
    """LAWA in a transformers ``Trainer``: snapshots, ``eval_lawa_*`` metrics, resumable state, the averaged model.

        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)
        lawa = LawaTrainerCallback(trainer, k=6)           # or every_n_steps=500 for step snapshots
        trainer.train(resume_from_checkpoint=...)         # the window resumes too
        averaged = lawa.scheduler.averaged_state_dict()

    Args:
        trainer: the Trainer to attach to (the callback adds itself; it needs the Trainer to evaluate and save).
        k, every_n_steps, start, device, params, shard: as for ``LawaScheduler``. Snapshots are taken at each
            epoch end (default) or every N optimizer steps (``every_n_steps``, counted as ``state.global_step``).
        output_dir: where the averaged model goes at the end of training (``save_pretrained``, and the
            processing class if the Trainer has one); default ``<args.output_dir>/lawa``. None-like ``""``
            skips it.
        evaluate: also evaluate θ^LAWA at every Trainer evaluation (default True).

    Evaluation. After each of the Trainer's evaluations (``eval_strategy``), the callback swaps θ^LAWA into the
    model and runs ``trainer.evaluation_loop`` on the very dataloader that evaluation used (same batches, same
    order, same ``compute_metrics``), then ``trainer.log``s the metrics under the prefix ``eval_lawa``
    (``eval_lawa_loss`` beside ``eval_loss``; ``eval_lawa_<name>_…`` for a dict of eval datasets). So
    ``trainer_state.json``'s ``log_history``, TensorBoard and W&B show both. ``eval_lawa_loss`` is thus
    computed exactly as ``eval_loss`` is (each batch's mean loss, weighted by its size, over the eval set),
    on the average of the min(k, taken) latest snapshots, the newest being this epoch's end (or this step's)
    when one was due: the Trainer evaluates after ``on_epoch_end``/``on_step_end``. With per-epoch snapshots
    and ``save_strategy="epoch"``, snapshot E holds the weights ``checkpoint-<step of epoch E>/`` holds, so
    the logged value at epoch E ≥ k equals a post-hoc window of k checkpoints ending there. Evaluations before
    the first snapshot log no LAWA metrics. ``eval_lawa_*`` keys do not reach ``metric_for_best_model`` or
    early stopping.

    State. On every save, the scheduler's state goes into ``checkpoint-N/lawa_state.safetensors`` (safetensors,
    settings as JSON in its metadata; no pickle), written by the main process, or by every rank as
    ``lawa_state-rank{r}-of-{W}.safetensors`` under ``shard=True``. The Trainer does not tell callbacks what it
    resumes from, so at ``on_train_begin`` a resumed run (``state.global_step > 0``) reads the file from
    ``args.resume_from_checkpoint`` if set, else ``<args.output_dir>/checkpoint-<global_step>`` (which
    ``resume_from_checkpoint=True`` picks); a missing file is a LawaError rather than a silently restarted
    window. Resuming a run that was stopped (``control.should_training_stop``) with the same arguments gives
    averages bit-identical to an uninterrupted run's. Checkpoints keep the live weights.
    """

    def __init__(
        self,
        trainer: Any,
        k: int,
        *,
        every_n_steps: int | None = None,
        start: int = 0,
        device: torch.device | str = "cpu",
        params: ParamFilter = "all",
        shard: bool = False,
        output_dir: str | os.PathLike | None = None,
        evaluate: bool = True,
    ) -> None:
        self.trainer = trainer
        self.scheduler = LawaScheduler(trainer.model, k, every_n_steps=every_n_steps, start=start, device=device,
                                       params=params, shard=shard)
        self.output_dir = Path(trainer.args.output_dir) / "lawa" if output_dir is None else output_dir
        self.evaluate = evaluate
        trainer.add_callback(self)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return
        checkpoint = args.resume_from_checkpoint
        if not isinstance(checkpoint, str) or not checkpoint:
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = Path(checkpoint) / _state_file(self.scheduler)
        if not path.is_file():
            raise LawaError(
                f"LawaTrainerCallback: resuming at step {state.global_step} but {path} does not exist; "
                "set TrainingArguments(resume_from_checkpoint=<that checkpoint>) if it lies elsewhere"
            )
        self.scheduler.load_file(path)

    def on_step_end(self, args, state, control, **kwargs):
        if self.scheduler.every_n_steps is not None:
            while self.scheduler.count < state.global_step:
                self.scheduler.step()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.scheduler.every_n_steps is None:
            self.scheduler.update()

    def on_evaluate(self, args, state, control, metrics=None, eval_dataloader=None, **kwargs):
        if not self.evaluate or self.scheduler.num_snapshots == 0 or eval_dataloader is None:
            return
        runtime = [key for key in metrics or {} if key.endswith("_runtime")]
        if len(runtime) != 1:
            return
        prefix = runtime[0][: -len("_runtime")]
        lawa_prefix = "eval_lawa" + prefix[len("eval"):] if prefix.startswith("eval") else f"{prefix}_lawa"
        trainer = self.trainer
        with self.scheduler.swapped_in():
            output = trainer.evaluation_loop(
                eval_dataloader,
                description="Evaluation of the LAWA average",
                prediction_loss_only=True if trainer.compute_metrics is None else None,
                metric_key_prefix=lawa_prefix,
            )
        trainer.log(output.metrics)

    def on_save(self, args, state, control, **kwargs):
        if not (self.scheduler.shard or state.is_world_process_zero):
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        checkpoint.mkdir(parents=True, exist_ok=True)
        self.scheduler.save_file(checkpoint / _state_file(self.scheduler))

    def on_train_end(self, args, state, control, **kwargs):
        if not self.output_dir or self.scheduler.num_snapshots == 0:
            return
        trainer = self.trainer
        with self.scheduler.swapped_in():  # a collective under shard=True: every rank enters
            if state.is_world_process_zero:
                def build(tmp: Path) -> None:
                    trainer.model.save_pretrained(tmp)
                    processor = getattr(trainer, "processing_class", None)  # `tokenizer` before transformers 4.46
                    if processor is not None:
                        processor.save_pretrained(tmp)

                _publish_dir(build, Path(self.output_dir))
        trainer.accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------------------
# Lightning
# ------------------------------------------------------------------------------------------------------


def _lawa_name(name: str) -> str:
    """``val_loss`` → ``val_lawa_loss``, ``val/acc`` → ``val/lawa_acc``, ``loss`` → ``lawa_loss``."""
    for sep in ("_", "/"):
        head, found, tail = name.partition(sep)
        if found and head in ("val", "valid", "validation"):
            return f"{head}{sep}lawa_{tail}"
    return f"lawa_{name}"


class _LightningHooks:
    """LAWA in a Lightning ``Trainer``: snapshots, ``val_lawa_*`` metrics, state in its checkpoints, lawa.ckpt.

        trainer = L.Trainer(max_epochs=90, callbacks=[LawaLightningCallback(k=6)])
        trainer.fit(module, train_loader, val_loader, ckpt_path=...)    # the window resumes with the run

    Args:
        k, every_n_steps, start, device, params, shard: as for ``LawaScheduler``; snapshots at each epoch end
            (default) or every N optimizer steps (``trainer.global_step``).
        save_to: where the averaged model goes at the end of ``fit``: a Lightning checkpoint written by
            ``trainer.save_checkpoint(weights_only=True)`` with θ^LAWA swapped in, so
            ``MyModule.load_from_checkpoint(save_to)`` loads it; default ``<default_root_dir>/lawa.ckpt``;
            ``""`` skips it.
        evaluate: also validate θ^LAWA at every validation (default True).

    Hook order. Lightning runs the validation of epoch E inside the training epoch, before
    ``on_train_epoch_end(E)``. The snapshot of epoch E is therefore taken in ``on_train_batch_end`` of the
    epoch's last batch (``trainer.num_training_batches``), so validation E sees θ^LAWA including E; for
    loaders without a length it falls back to ``on_train_epoch_end`` (then validation lags one snapshot).

    Evaluation. In ``on_validation_epoch_end`` (not during the sanity check, nor before the first snapshot)
    the callback swaps θ^LAWA in and calls the module's ``validation_step`` on the same validation batches,
    catching its ``self.log`` calls: each logged value is averaged over the batches, weighted by batch size as
    Lightning does, and logged through ``self.log`` as ``val_lawa_<name>`` (``val/lawa_<name>``; other names
    get a ``lawa_`` prefix) with the call's own ``sync_dist``/``prog_bar``. So it appears in
    ``trainer.callback_metrics`` and every logger. ``validation_step`` should have no side effects besides
    logging (outputs collected for ``on_validation_epoch_end`` would see the LAWA batches too).

    State goes through Lightning's callback ``state_dict`` / ``load_state_dict`` (tensors, ints and lists;
    under ``shard=True`` the ranks' slices are gathered into the one checkpoint and each rank takes its own
    back). ``ModelCheckpoint`` files keep the live weights in ``state_dict``.

    Relation to Lightning's ``WeightAveraging`` (2.6): that callback keeps one ``AveragedModel`` (SWA or EMA)
    and puts its averaged weights into the checkpoint's ``state_dict`` (the live ones under
    ``current_model_state``), so the files no longer hold the trajectory a post-hoc sweep needs, and its
    validation reports only the average. This one keeps a window of the k latest snapshots, leaves
    ``state_dict`` alone and reports both. It reuses the same hooks for the same jobs: ``on_train_batch_end``
    and ``on_train_epoch_end`` to update, ``on_validation_epoch_end`` for the averaged weights (where
    ``WeightAveraging`` swaps them back), ``state_dict``/``load_state_dict`` for resume, ``on_train_end`` for
    the final weights.
    """

    def __init__(
        self,
        k: int,
        *,
        every_n_steps: int | None = None,
        start: int = 0,
        device: torch.device | str = "cpu",
        params: ParamFilter = "all",
        shard: bool = False,
        save_to: str | os.PathLike | None = None,
        evaluate: bool = True,
    ) -> None:
        super().__init__()
        self._settings = {"k": k, "every_n_steps": every_n_steps, "start": start, "device": device,
                          "params": params, "shard": shard}
        self.scheduler: LawaScheduler | None = None  # built in setup(), when the module and ranks exist
        self.save_to = save_to
        self.evaluate = evaluate
        self._pending_state: dict[str, Any] | None = None
        self._snapshot_epoch = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.scheduler is None:
            self.scheduler = LawaScheduler(pl_module, **self._settings)
        if self._pending_state is not None:
            self._load(self._pending_state)
            self._pending_state = None

    # -- snapshots -----------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        lawa = self.scheduler
        if lawa.every_n_steps is not None:
            while lawa.count < trainer.global_step:
                lawa.step()
        elif batch_idx + 1 == trainer.num_training_batches:
            self._epoch_snapshot(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.scheduler.every_n_steps is None:
            self._epoch_snapshot(trainer)

    def _epoch_snapshot(self, trainer) -> None:
        if self._snapshot_epoch != trainer.current_epoch:
            self._snapshot_epoch = trainer.current_epoch
            self.scheduler.update()

    # -- evaluation ----------------------------------------------------------------------------------

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.evaluate or trainer.sanity_checking or self.scheduler.num_snapshots == 0:
            return
        from torch.utils.data import DataLoader

        loaders = trainer.val_dataloaders
        loaders = [loaders] if isinstance(loaders, DataLoader) or not isinstance(loaders, (list, tuple)) else loaders
        logged: dict[str, list] = {}  # name → [Σ value·batch_size, Σ batch_size, the first call's options]
        extract_batch_size = _lightning()[1]

        def catch(name, value, *args, batch_size=None, **options):
            size = batch_size if batch_size is not None else extract_batch_size(batch)
            value = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
            entry = logged.setdefault(name, [0.0, 0, options])
            entry[0] += value * size
            entry[1] += size

        pl_module.log = catch  # log_dict calls self.log too
        try:
            with self.scheduler.swapped_in():
                for index, loader in enumerate(loaders):
                    limit = trainer.num_val_batches[index] if index < len(trainer.num_val_batches) else float("inf")
                    for batch_idx, batch in enumerate(loader):
                        if batch_idx >= limit:
                            break
                        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=index)
                        extra = (index,) if len(loaders) > 1 else ()
                        pl_module.validation_step(batch, batch_idx, *extra)
        finally:
            del pl_module.log
        for name, (total, size, options) in logged.items():
            keep = {key: options[key] for key in ("prog_bar", "sync_dist", "logger") if key in options}
            pl_module.log(_lawa_name(name), (total / max(size, 1)).float(), on_step=False, on_epoch=True,
                          batch_size=size, **keep)

    # -- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.scheduler is None:
            return {}
        state = self.scheduler.state_dict()
        if not self.scheduler.shard:
            return {"scheduler": state}
        ranks: list = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, state)  # Lightning writes rank 0's callback state only
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.scheduler is None:  # Lightning restores callback states after setup(); be safe either way
            self._pending_state = state_dict
        else:
            self._load(state_dict)

    def _load(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if "ranks" in state:
            ranks = state["ranks"]
            rank = dist.get_rank() if dist.is_initialized() else 0
            if len(ranks) != (dist.get_world_size() if dist.is_initialized() else 1):
                raise LawaError(f"LawaLightningCallback: the checkpoint holds {len(ranks)} ranks' LAWA slices; "
                                "resume shard=True on the same number of processes")
            self.scheduler.load_state_dict(ranks[rank])
        else:
            self.scheduler.load_state_dict(state["scheduler"])

    # -- the end -------------------------------------------------------------------------------------

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_to == "" or self.scheduler.num_snapshots == 0:
            return
        final = Path(trainer.default_root_dir) / "lawa.ckpt" if self.save_to is None else Path(self.save_to)
        tmp = final.with_name(f".{final.name}.tmp")
        with self.scheduler.swapped_in():  # every rank: a collective under shard=True
            trainer.save_checkpoint(tmp, weights_only=True)
        if trainer.is_global_zero:
            os.replace(tmp, final)
        trainer.strategy.barrier("lawa.ckpt")


# ------------------------------------------------------------------------------------------------------
# Classes built on first use, on the framework's own base class
# ------------------------------------------------------------------------------------------------------


def _lightning() -> tuple[type, Callable]:
    """(Callback base class, extract_batch_size) of the Lightning that is installed."""
    try:
        from lightning.pytorch import Callback
        from lightning.pytorch.utilities.data import extract_batch_size
    except ImportError:
        try:
            from pytorch_lightning import Callback
            from pytorch_lightning.utilities.data import extract_batch_size
        except ImportError:
            raise LawaError("LawaLightningCallback needs Lightning: pip install lightning") from None
    return Callback, extract_batch_size


def _build(name: str) -> type:
    if name == "LawaTrainerCallback":
        try:
            from transformers import TrainerCallback
        except ImportError:
            raise LawaError("LawaTrainerCallback needs transformers: pip install transformers") from None
        hooks, base = _TrainerHooks, TrainerCallback
    else:
        hooks, base = _LightningHooks, _lightning()[0]
    cls = type(name, (hooks, base), {"__module__": __name__, "__doc__": hooks.__doc__})
    cls.__qualname__ = name
    return cls


def __getattr__(name: str) -> type:
    if name in ("LawaTrainerCallback", "LawaLightningCallback"):
        globals()[name] = cls = _build(name)
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
