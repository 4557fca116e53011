"""Checkpoints after every epoch, so that `graft train --resume` continues a killed run exactly.

    RUN/checkpoint/
      tensors.safetensors   the trained parameters and every buffer (now and at the best epoch),
                            the optimizer's state, the torch and generator RNG states (uint8)
      state.json            format version, phase, epoch, history, best epoch/accuracy/loss,
                            scheduler state, optimizer hyper-parameters, Python/NumPy RNG states,
                            strategy extras (the thaw stage of `gradual`)

Nothing here is pickled: tensors go to safetensors, everything else to JSON. The folder is
written with `graft.run_folder.replace_dir`, so a SIGKILL leaves the previous epoch's checkpoint or the new one.

A strategy's training function asks for a `PhaseCheckpoint` right before `fit` with
`start_phase(context, "head", model=..., optimizer=..., scheduler=..., generators={...})`; on
resume that restores every state and returns `fit`'s `start_epoch/history/best` in `fit_kwargs`;
its `save(state)` goes in `fit`'s `on_epoch`. A "phase" names one `fit` of a run (`lp-ft` has
two: "head", then "finetune"); a phase finished before the checkpoint was taken is re-run from
the seed without saving (it is deterministic and cheap), then the checkpointed phase resumes.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from graft.errors import ConfigError, DataError
from graft.run_folder import replace_dir
from graft.training import distributed
from graft.training.loop import EpochRecord, FitState

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FORMAT = 1
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
# Epochs of a head on cached features take milliseconds while a checkpoint costs tens of them
# (fsync); so a checkpoint is written after an epoch only if the last one is this old. Slow
# epochs (fine-tuning) are each checkpointed; a kill repeats at most this much fast work.
CHECKPOINT_EVERY_SECONDS = 2.0


class Checkpointer:
    """Where a run's checkpoint lives, and whether this process resumes from it."""

    def __init__(self, run_dir: str | Path, *, resume: bool) -> None:
        self.folder = Path(run_dir) / CHECKPOINT_DIR
        self.resume = resume
        self._stored = read_checkpoint(self.folder) if resume else None
        self._phases: list[str] = []

    @property
    def stored_epoch(self) -> int | None:
        """The last checkpointed epoch (0-based) of the run being resumed, if any."""
        return None if self._stored is None else int(self._stored[0]["epoch"])

    def start(
        self,
        phase: str,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        generators: Mapping[str, torch.Generator],
    ) -> "PhaseCheckpoint":
        """Begin one `fit` of the run; restores its state when resuming this very phase."""
        completed = list(self._phases)
        self._phases.append(phase)
        checkpoint = PhaseCheckpoint(self, phase, completed, model, optimizer, scheduler, dict(generators))
        if self._stored is None:
            return checkpoint
        meta, tensors = self._stored
        if phase in meta.get("completed_phases", []):
            # Re-run from the seed (deterministic); keep the later phase's checkpoint intact.
            checkpoint.saving = False
            return checkpoint
        if meta["phase"] != phase:
            raise ConfigError(
                f"{self.folder}: the checkpoint is of training phase {meta['phase']!r}, but this run "
                f"reached phase {phase!r} first; the run's options changed. Start over without --resume."
            )
        checkpoint.restore(meta, tensors)
        self._stored = None  # one phase resumes; what follows runs on from there
        return checkpoint

    def remove(self) -> None:
        """Delete the checkpoint (the finished run's bundle is the result now)."""
        if not self.folder.exists():
            return
        # Renamed first so that a kill mid-delete never leaves a half checkpoint under its name.
        doomed = self.folder.with_name(f".{CHECKPOINT_DIR}.{uuid.uuid4().hex[:8]}.old")
        self.folder.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


@dataclass
class PhaseCheckpoint:
    """The checkpoint of one `fit`: `fit_kwargs` to continue it, `save` after every epoch."""

    owner: Checkpointer | None
    phase: str
    completed_phases: list[str]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generators: dict[str, torch.Generator]
    saving: bool = True
    fit_kwargs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    last_saved: float | None = None  # time.monotonic() of this phase's last checkpoint

    @property
    def start_epoch(self) -> int:
        return int(self.fit_kwargs.get("start_epoch", 0))

    def save(self, state: FitState, extra: Mapping[str, Any] | None = None) -> None:
        """Write the checkpoint of the epoch just completed (from `fit`'s `on_epoch`).

        The first epoch is always saved, later ones when `CHECKPOINT_EVERY_SECONDS` have passed.
        """
        if self.owner is None or not self.saving or not distributed.is_main():
            return
        now = time.monotonic()
        if self.last_saved is not None and now - self.last_saved < CHECKPOINT_EVERY_SECONDS:
            return
        self.last_saved = now
        names = trained_names(self.model, self.optimizer)
        current = self.model.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        for key in names:
            tensors[f"model.{key}"] = current[key]
            if key in state.best_state:
                tensors[f"best.{key}"] = state.best_state[key]
        optimizer_state = self.optimizer.state_dict()
        for index, values in optimizer_state["state"].items():
            for name, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{index}.{name}"] = value
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for device, rng in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{device}"] = rng
        for name, generator in self.generators.items():
            tensors[f"generator.{name}"] = generator.get_state()
        meta = {
            "format_version": CHECKPOINT_FORMAT,
            "phase": self.phase,
            "completed_phases": self.completed_phases,
            "epoch": state.history[-1].epoch,
            "history": [record.to_dict() for record in state.history],
            "best_epoch": state.best_epoch,
            "best_val_accuracy": state.best_val_accuracy,
            "best_val_loss": state.best_val_loss,
            "scheduler": _plain(self.scheduler.state_dict()),
            "optimizer": {
                "param_groups": _plain(optimizer_state["param_groups"]),
                "scalars": {
                    str(index): {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
                    for index, values in optimizer_state["state"].items()
                },
            },
            "rng": {"python": _plain(random.getstate()), "numpy": _numpy_state()},
            "extra": _plain(dict(extra or {})),
        }
        write_checkpoint(self.owner.folder, meta, tensors)

    def restore(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Put the model, optimizer, scheduler and every RNG back where the checkpoint left them."""
        folder = self.owner.folder if self.owner else CHECKPOINT_DIR
        names = trained_names(self.model, self.optimizer)
        saved = {key[len("model."):] for key in tensors if key.startswith("model.")}
        if saved != set(names):
            raise ConfigError(
                f"{folder}: the checkpoint's weights do not match this run's model "
                f"({len(saved ^ set(names))} tensors differ); the options changed. Start over without --resume."
            )
        with torch.no_grad():
            current = self.model.state_dict()
            for key in names:
                current[key].copy_(tensors[f"model.{key}"])
        best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        for key in names:
            if f"best.{key}" in tensors:
                best_state[key] = tensors[f"best.{key}"].clone()
        # Parameters that never train are the same now as at the best epoch; only trained ones differ.
        optimizer_state: dict[str, Any] = {"state": {}, "param_groups": _groups_back(meta["optimizer"]["param_groups"])}
        for index, scalars in meta["optimizer"]["scalars"].items():
            optimizer_state["state"][int(index)] = dict(scalars)
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                optimizer_state["state"].setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(meta["scheduler"])
        for name, generator in self.generators.items():
            generator.set_state(tensors[f"generator.{name}"])
        random.setstate(_tuples(meta["rng"]["python"]))
        kind, keys, position, has_gauss, cached = meta["rng"]["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
        torch.set_rng_state(tensors["rng.torch"])
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        history = [EpochRecord(**record) for record in meta["history"]]
        self.fit_kwargs = {
            "start_epoch": int(meta["epoch"]) + 1,
            "history": history,
            "best": (int(meta["best_epoch"]), float(meta["best_val_accuracy"]), float(meta["best_val_loss"]), best_state),
        }
        self.extra = dict(meta.get("extra") or {})


def start_phase(
    context: Any,
    phase: str,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generators: Mapping[str, torch.Generator],
) -> PhaseCheckpoint:
    """The checkpoint of one `fit` for a strategy's `TrainContext` (a no-op one without a run).

    Call it right before `fit`: on resume it resets the global RNGs to the checkpoint's, and
    nothing may draw from them between here and the first epoch.
    """
    owner: Checkpointer | None = getattr(context, "checkpoint", None)
    if owner is None:
        return PhaseCheckpoint(None, phase, [], model, optimizer, scheduler, dict(generators))
    return owner.start(phase, model=model, optimizer=optimizer, scheduler=scheduler, generators=generators)


def trained_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """State-dict keys that training can change: the optimizer's parameters and every buffer."""
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = [name for name, p in model.named_parameters() if id(p) in in_optimizer]
    names += [name for name, _ in model.named_buffers()]
    return sorted(set(names) & set(model.state_dict()))


def write_checkpoint(folder: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write the checkpoint folder atomically (safetensors + JSON)."""
    from safetensors.torch import save_file

    # safetensors refuses views and shared storage: every tensor gets its own contiguous copy.
    plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    with replace_dir(folder) as temporary:
        save_file(plain, str(temporary / TENSORS_FILE))
        (temporary / STATE_FILE).write_text(json.dumps(meta) + "\n", encoding="utf-8")


def read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(state.json, tensors) of a checkpoint folder, or None when there is none."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        # Killed between atomic_dir's two renames: the previous checkpoint waits, complete, aside.
        aside = sorted(folder.parent.glob(f".{folder.name}.*.old"))
        if not aside:
            return None
        folder = aside[-1]
    state_path, tensors_path = folder / STATE_FILE, folder / TENSORS_FILE
    if not state_path.is_file() or not tensors_path.is_file():
        raise ConfigError(f"{folder}: the checkpoint is incomplete; start over without --resume")
    try:
        meta = json.loads(state_path.read_text(encoding="utf-8"))
        tensors = load_file(str(tensors_path))
    except Exception as error:
        raise ConfigError(f"{folder}: the checkpoint cannot be read ({error}); start over without --resume") from None
    if meta.get("format_version") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"{state_path}: checkpoint format {meta.get('format_version')!r}, this graft reads format "
            f"{CHECKPOINT_FORMAT}; resume it with the graft version that wrote it, or start over"
        )
    return meta, tensors


# --- JSON round trips of RNG and optimizer state -----------------------------------------------


def _plain(value: Any) -> Any:
    """Tuples to lists, tensors and NumPy scalars to numbers: what JSON holds."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _tuples(value: Any) -> Any:
    """The inverse of `_plain` for `random.setstate`, which wants nested tuples."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _groups_back(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Adam's betas were a tuple; keep the optimizer's types as they were.
    return [{k: (tuple(v) if k == "betas" else v) for k, v in group.items()} for group in groups]


def _numpy_state() -> list[Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(position), int(has_gauss), float(cached)]


# --- resuming a run -------------------------------------------------------------------------------

# Settings that do not change what a run computes: they may differ between a run and its resume.
RESULT_NEUTRAL_OPTIONS = frozenset({"out", "cache_dir", "compile"})
_TEMPORARY_NAME = re.compile(r"^\.[^/]+\.[0-9a-f]{8}\.(tmp|old)$")


def prepare_checkpoints(config: Any, *, resume: bool, warn: Callable[[str], None]) -> Checkpointer:
    """The run's `Checkpointer`; with `resume`, first check that the run can be continued as asked.

    Refuses (`ConfigError`) when there is no run to resume, when it finished already, or when an
    option that changes the result differs from the run's `config.json` (each one named).
    """
    run_dir = Path(config.out)
    folder = run_dir / CHECKPOINT_DIR
    if not resume:
        if folder.exists():
            warn(f"{run_dir} holds the checkpoint of an interrupted run; starting over (pass --resume to continue it)")
        return Checkpointer(run_dir, resume=False)
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        raise ConfigError(
            f"--resume: {run_dir} holds no run to continue (no config.json); check --out, or train without --resume"
        )
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"--resume: {saved_path} is not valid JSON ({error}); train again without --resume") from None
    differences = differing_options(saved, config.to_dict())
    if differences:
        listing = "; ".join(f"--{name.replace('_', '-')} was {old!r}, now {new!r}" for name, old, new in differences)
        raise ConfigError(
            f"--resume: these options differ from the run in {saved_path}: {listing}. "
            "Resume with the run's own options, or train into another --out folder."
        )
    checkpointer = Checkpointer(run_dir, resume=True)
    if checkpointer.stored_epoch is None:
        if (run_dir / "bundle").is_dir() and (run_dir / "metrics.json").is_file():
            raise ConfigError(f"--resume: the run in {run_dir} finished already (its bundle/ is written); nothing to resume")
        warn(f"{run_dir}: no checkpoint yet (the run stopped before its first epoch ended); training from the start")
    else:
        warn(f"resuming {run_dir} after epoch {checkpointer.stored_epoch + 1}")
    remove_temporaries(run_dir)
    return checkpointer


def differing_options(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(option, saved value, new value) for every result-changing option that differs."""
    differences = []
    for name in sorted(set(saved) | set(new)):
        if name in RESULT_NEUTRAL_OPTIONS or name == "resolved":
            continue
        old, now = saved.get(name), new.get(name)
        if name in ("data", "weights") and old is not None and now is not None:
            if Path(old).resolve() == Path(now).resolve():
                continue
        if old != now:
            differences.append((name, old, now))
    return differences


def remove_temporaries(run_dir: Path) -> None:
    """Delete what killed writes left behind (hidden `.NAME.xxxxxxxx.tmp`/`.old` names only)."""
    recovering = not (Path(run_dir) / CHECKPOINT_DIR).is_dir()
    for path in Path(run_dir).iterdir():
        if not _TEMPORARY_NAME.match(path.name):
            continue
        if recovering and path.name.startswith(f".{CHECKPOINT_DIR}."):
            continue  # the only complete checkpoint may be the one set aside (see read_checkpoint)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def check_same_data(run_dir: Path, data: str | Path, record: Mapping[str, Any]) -> None:
    """Refuse (`DataError`) to resume on data that differs from the run's `split.json`, naming how.

    A resumed run must see the images it started with: other classes change the head's shape,
    other files change the batches, and neither could continue the checkpointed epoch.
    """

    saved_path = Path(run_dir) / "split.json"
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return  # the run stopped before writing it: it starts from the beginning anyway
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise DataError(f"--resume: {saved_path} cannot be read ({error}); train again without --resume") from None
    changes = []
    old_classes, new_classes = list(saved.get("class_names", [])), list(record["class_names"])
    added, removed = [c for c in new_classes if c not in old_classes], [c for c in old_classes if c not in new_classes]
    if added:
        changes.append(f"classes added: {', '.join(added)}")
    if removed:
        changes.append(f"classes removed: {', '.join(removed)}")
    if not added and not removed and old_classes != new_classes:
        changes.append(f"class order changed: was {', '.join(old_classes)}, now {', '.join(new_classes)}")

    def labelled(split: Mapping[str, Any]) -> dict[str, str]:
        return {str(path): str(label) for part in ("train", "val") for path, label in split.get(part, [])}

    old_files, new_files = labelled(saved), labelled(record)
    for what, names in (
        ("images added", sorted(set(new_files) - set(old_files))),
        ("images removed", sorted(set(old_files) - set(new_files))),
        ("images relabelled", sorted(p for p in set(old_files) & set(new_files) if old_files[p] != new_files[p])),
    ):
        if names:
            count = f"{len(names)} {what}" if len(names) > 1 else what.replace("images", "image")
            changes.append(f"{count} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    if not changes and (saved.get("train"), saved.get("val")) != (record["train"], record["val"]):
        changes.append("the same images are split differently between training and validation")
    if changes:
        raise DataError(
            f"--resume: the data in {data} changed since the run in {run_dir} started "
            f"({'; '.join(changes)}); put the data back as it was to resume, or train again with --overwrite "
            "(or into a new --out)"
        )
