"""What a fine-tuning trial keeps on disk, in its own folder: its epoch checkpoints and its progress.

    <trial>/epoch_0003/state.pt     torch.save of plain tensors (read with weights_only=True)
    <trial>/progress.json           the metrics of every committed epoch, in order

An epoch is committed in two steps: its checkpoint folder is written under a temporary name and renamed, then
progress.json is replaced by a copy that ends with that epoch. A trial killed between the steps redoes that
epoch; one killed at any other moment resumes from its last committed epoch. Nothing here is a pickle, so a
resumed run reads a folder that someone else may have written without running their code.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from hawq_ray.contract import HawqError

CHECKPOINT_FILE = "state.pt"
PROGRESS_FILE = "progress.json"


class TrialRecord:
    def __init__(self, folder):
        self.folder = Path(folder)

    def checkpoint(self, epoch: int) -> Path:
        """The folder of the checkpoint after `epoch` epochs (1-based, as the metrics count them)."""
        return self.folder / f"epoch_{int(epoch):04d}"

    def progress(self) -> list[dict]:
        """The committed epochs' metrics; [] for a new trial. Entries after one whose checkpoint is the newest
        and missing are not committed."""
        path = self.folder / PROGRESS_FILE
        if not path.is_file():
            return []
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError:
            return []                      # cut off mid-write by a kill that beat the rename: start over
        if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("epoch"), int)
                                                 for r in rows):
            return []
        while rows and not (self.checkpoint(rows[-1]["epoch"]) / CHECKPOINT_FILE).is_file():
            rows.pop()
        return rows

    def load_last(self, progress: list, load) -> dict:
        """`load(path)` of the newest committed checkpoint. One that cannot be read is set aside (renamed
        `.epoch_NNNN.unreadable`) before the error is raised, so the next run continues from the epoch before
        it, or starts the trial over."""
        epoch = progress[-1]["epoch"]
        try:
            return load(self.checkpoint(epoch) / CHECKPOINT_FILE)
        except HawqError as e:
            aside = self.folder / f".epoch_{epoch:04d}.unreadable"
            shutil.rmtree(aside, ignore_errors=True)
            self.checkpoint(epoch).rename(aside)
            before = f"epoch {progress[-2]['epoch']}" if len(progress) > 1 else "the start"
            raise HawqError(f"{e}; set aside as {aside.name}, so the next run continues this trial from "
                            f"{before}") from None

    def commit(self, metrics: dict, save) -> None:
        """Write the checkpoint of epoch metrics['epoch'] by calling save(path_of_state_file), then record it."""
        epoch = int(metrics["epoch"])
        final, partial = self.checkpoint(epoch), self.folder / f".epoch_{epoch:04d}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save(partial / CHECKPOINT_FILE)
        shutil.rmtree(final, ignore_errors=True)   # an epoch redone after a kill between the two steps
        partial.rename(final)
        rows = [r for r in self.progress() if r["epoch"] < epoch] + [dict(metrics)]
        tmp = self.folder / f".{PROGRESS_FILE}.partial"
        tmp.write_text(json.dumps(rows))
        tmp.replace(self.folder / PROGRESS_FILE)

    def prune(self, keep: int | None) -> None:
        """Keep the `keep` newest epoch checkpoints (all when None); the newest is always kept."""
        if keep is None:
            return
        epochs = sorted(int(p.name.split("_")[1]) for p in self.folder.glob("epoch_*") if p.is_dir())
        for epoch in epochs[:-max(1, keep)]:
            shutil.rmtree(self.checkpoint(epoch), ignore_errors=True)
