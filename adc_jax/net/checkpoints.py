"""Each side's checkpoints: orbax, one array tree and one JSON record per step, saved in full.

Unlike the in-process run's checkpoints, a side may restore an older step than its newest (to
meet the other side, see ``docs/network.md``), so every save waits until it is on disk before
the side goes on, and steps after a restored one are deleted.
"""

from __future__ import annotations

import os
from typing import Any

import jax


class Checkpoints:
    """``directory/<step>/{state,meta}``; keeps the newest ``max_to_keep``."""

    def __init__(self, directory: str, max_to_keep: int = 3):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=False
            ),
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def meta(self, step: int) -> dict[str, Any]:
        args = self._ocp.args.Composite(meta=self._ocp.args.JsonRestore())
        return self._manager.restore(step, args=args).meta

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """The state saved at ``step`` in ``target``'s structure, and its JSON record."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardRestore(abstract), meta=self._ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        state = jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored.state))
        return state, restored.meta

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves and waits until the checkpoint is complete on disk."""
        if step in self._manager.all_steps():
            self._manager.delete(step)
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(jax.device_get(state)),
            meta=self._ocp.args.JsonSave(meta),
        )
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()

    def delete_after(self, step: int) -> None:
        for s in self.steps():
            if s > step:
                self._manager.delete(s)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
