"""How a fit ends, and how the same command finishes a run that was killed after its training ended.

At the end of every fit that trained: the keypoint tokens are ranked for the trained context, the
last checkpoint is written again with them (so that ``test`` and ``predict`` from it need not rank
them), and the context file is exported. A fit resumed from a checkpoint whose training had already
ended (killed while ranking or exporting) trains no step; ``finish_resumed`` does what was left.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from lightning_modules import detector
from lightning_modules.app.checkpoints import add_keypoint_tokens
from lightning_modules.app.run_folder import EMBEDDING_FILE


def finish_fit(module) -> None:
    """A ``StableKeypoints`` at the end of its training: ranks, refreshes the last checkpoint, exports."""
    trainer = module.trainer
    last = getattr(trainer.checkpoint_callback, "last_model_path", "")
    if trainer.datamodule is not None:  # (a Trainer given bare loaders has no training images to rank on)
        module.choose_keypoint_tokens()
        # The last checkpoint was written before the tokens existed: refresh it so that test and
        # predict from it need not rank them again (its loops still record where a larger max_steps
        # continues: app/checkpoints.as_continuable). save_checkpoint holds a barrier, so every rank
        # must take the same branch: rank 0 (the one that writes) decides, since on node-local disks
        # the file exists on its node only.
        if trainer.strategy.broadcast(bool(last) and Path(last).exists(), src=0):
            trainer.save_checkpoint(last, weights_only=False)  # a full checkpoint, as ModelCheckpoint's
    if trainer.is_global_zero:
        path = detector.export_context(module, module.run_dir() / EMBEDDING_FILE, checkpoint=last or None)
        rank_zero_info(f"Context exported to {path}")


def finish_resumed(module, global_step: int) -> None:
    """Ranks the keypoint tokens of a resumed finished context (unless its checkpoint holds them), adds them
    to that checkpoint and exports the context file, unless the run's context file already holds this state."""
    trainer = module.trainer
    ckpt_path = str(Path(trainer.ckpt_path).resolve())
    path = module.run_dir() / EMBEDDING_FILE
    if trainer.strategy.broadcast(detector.holds_state(path, ckpt_path, global_step), src=0):
        rank_zero_info(f"Nothing to train: the run's training had ended at step {global_step} and {path} holds it.")
        return
    rank_zero_info(f"Training had ended at step {global_step}: finishing the run (keypoint tokens, {path}).")
    ranked = not module.keypoint_tokens.numel() and trainer.datamodule is not None
    if ranked:
        module.choose_keypoint_tokens()
    if trainer.is_global_zero:
        if ranked:
            add_keypoint_tokens(ckpt_path, module.keypoint_tokens, global_step)
        detector.export_context(module, path, checkpoint=ckpt_path, global_step=global_step)
        rank_zero_info(f"Context exported to {path}")
