"""The ``call_with`` slot (runtime/models/call_slot.py): a callable in place of the module's call, no recursion."""
import torch

from runtime.models.call_slot import CallSlot
from runtime.models.layers import Linear


class Block(CallSlot):
    def __init__(self):
        super().__init__()
        self.proj = Linear(4, 4)

    def forward(self, x):
        return self.proj(x)


def test_slot_runs_in_place_of_the_call_and_clearing_it_gives_the_module_back():
    torch.manual_seed(0)
    block, x = Block(), torch.randn(2, 4)
    own = block(x)
    block.call_with = lambda x: x * 0 + 7
    assert torch.equal(block(x), torch.full_like(x, 7))
    del block.call_with
    assert "call_with" not in vars(block) and torch.equal(block(x), own)


def test_a_slot_that_calls_the_module_again_gets_the_modules_own_call_and_hooks():
    torch.manual_seed(0)
    block, x = Block(), torch.randn(2, 4)
    seen = []
    block.register_forward_pre_hook(lambda m, args: seen.append("hook"))
    own = block(x)
    calls = []

    def wrapper(x):  # what a compiled module does when dynamo falls back to running the frame
        calls.append("slot")
        return block(x)

    block.call_with = wrapper
    assert torch.equal(block(x), own) and calls == ["slot"] and seen == ["hook", "hook"]
