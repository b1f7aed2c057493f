"""Freeing the weights of the modules a UNet call never runs (everything after the early stop)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


class UnreachedWeights:
    """Finds, during one UNet call, the modules the call never runs, then frees their weights.

    Under the early stop everything after the last captured layer (for SD 1.5's default layers the
    rest of ``up_blocks.2``, ``up_blocks.3`` and the output convolution: 70 M parameters, 0.26 GiB
    in fp32) never runs, yet its weights stay in memory. Which modules a call reaches is recorded
    by forward pre-hooks on the first call (a family's extra passes, e.g. zero123plus' reference
    pass, included), so nothing is guessed from module order. Each freed parameter keeps its dtype
    and device with zero elements: a call that did reach it would fail on the shapes, never run on
    stale values; moving the module between devices still works.
    """

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self.reached: set[str] = set()
        self._hooks = [module.register_forward_pre_hook(self._reach(name)) for name, module in unet.named_modules()]

    def _reach(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self.reached.add(name)
        return hook

    def release(self) -> int:
        """Removes the hooks and frees every parameter and buffer of an unreached module -> how many elements."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        # A container (ModuleList) is iterated, never called: it lives if anything inside it ran.
        alive = {""}
        for name in self.reached:
            parts = name.split(".")
            alive.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        freed = 0
        for name, module in self.unet.named_modules():
            if name in alive or name.rpartition(".")[0] not in alive:
                continue  # it ran, or it is inside an unreached module freed already
            for tensor in [*module.parameters(), *module.buffers()]:
                freed += tensor.numel()
                tensor.data = tensor.data.new_empty(0)
        return freed
