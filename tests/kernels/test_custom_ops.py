"""The kernels are registered custom ops (torch.ops.diffusion_runtime.*): torch.compile(fullgraph=True)
traces each as one graph node, with no graph break, and the compiled function gives the eager
result. Under the interpreter the ops are opaque custom ops with fake (shape) functions; with
compiled Triton they are triton_ops whose launches inductor sees (checked on CUDA only).
The graph is captured with a recording backend that runs it eagerly: inductor's CPU backend
cannot run Triton kernels, and the point here is the trace."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from runtime import kernels  # noqa: E402


def compile_and_capture(fn, *args):
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=recording_backend)(*args)
    assert len(graphs) == 1, "one graph: no graph break"
    targets = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    return out, targets


def test_attention_traces_as_one_op(device):
    q, k, v = (torch.randn(1, 2, 9, 16, device=device) for _ in range(3))
    mask = torch.zeros(1, 1, 9, 9, device=device)

    def fn(q, k, v, mask):
        return kernels.attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(1, 9, 32) * 2

    out, targets = compile_and_capture(fn, q, k, v, mask)
    assert targets.count(torch.ops.diffusion_runtime.attention.default) == 1
    torch.testing.assert_close(out, fn(q, k, v, mask))


def test_group_norm_and_geglu_trace_as_one_op_each(device):
    x = torch.randn(1, 16, 5, 3, device=device).to(memory_format=torch.channels_last)
    weight, bias = torch.randn(16, device=device), torch.randn(16, device=device)
    tokens, w_proj = torch.randn(1, 15, 16, device=device), torch.randn(24, 16, device=device)

    def fn(x, weight, bias, tokens, w_proj):
        h = kernels.group_norm(x, 4, weight, bias, 1e-5, silu=True)
        return h + 1, kernels.geglu(tokens, w_proj, None)

    (h, g), targets = compile_and_capture(fn, x, weight, bias, tokens, w_proj)
    assert targets.count(torch.ops.diffusion_runtime.group_norm.default) == 1
    assert targets.count(torch.ops.diffusion_runtime.geglu_activation.default) == 1
    h_eager, g_eager = fn(x, weight, bias, tokens, w_proj)
    torch.testing.assert_close(h, h_eager)
    torch.testing.assert_close(g, g_eager)
    assert h.is_contiguous(memory_format=torch.channels_last)  # the fake function kept the layout


def test_fake_functions_match_the_real_layouts(device):
    """Shapes and strides from the fake (meta) path equal the real outputs'."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = torch.randn(2, 7, 3, 16, device=device).transpose(1, 2)
    x = torch.randn(1, 16, 5, 3, device=device).to(memory_format=torch.channels_last)
    proj = torch.randn(4, 5, 40, device=device)
    real = [torch.ops.diffusion_runtime.attention(q, q, q, None, 0.25), torch.ops.diffusion_runtime.group_norm(x, 4, None, None, 1e-5, False),
            torch.ops.diffusion_runtime.geglu_activation(proj)]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fx, fp = (mode.from_tensor(t) for t in (q, x, proj))
        fake = [torch.ops.diffusion_runtime.attention(fq, fq, fq, None, 0.25),
                torch.ops.diffusion_runtime.group_norm(fx, 4, None, None, 1e-5, False),
                torch.ops.diffusion_runtime.geglu_activation(fp)]
    for r, f in zip(real, fake):
        assert (tuple(r.shape), r.stride(), r.dtype) == (tuple(f.shape), f.stride(), f.dtype)
