"""runtime/optim/token_merge.py against tomesd's bipartite_soft_matching_random2d (the reference algorithm)."""
import pytest
import torch

from runtime.optim.token_merge import bipartite_merge


@pytest.fixture
def tomesd_merge():
    return pytest.importorskip("tomesd.merge")


# (batch, grid h, grid w, channels, sx, sy, random cells): square and odd grids, a grid that the
# cells do not divide (its last row and column stay sources), and tomesd's no_rand.
CASES = [(2, 32, 32, 128, 2, 2, True), (1, 16, 16, 64, 2, 2, False), (2, 15, 17, 32, 2, 2, True),
         (3, 12, 8, 40, 2, 3, True), (2, 8, 8, 16, 1, 2, False)]


def _pair(tomesd_merge, x, h, w, sx, sy, rand, r, seed=3):
    ref = tomesd_merge.bipartite_soft_matching_random2d(
        x, w, h, sx, sy, r, no_rand=not rand, generator=torch.Generator().manual_seed(seed))
    ours = bipartite_merge(x, w, h, sx, sy, r, generator=torch.Generator().manual_seed(seed) if rand else None)
    return ref, ours


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])) + ("-rand" if c[6] else "-fixed"))
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.9])
def test_fp32_matches_tomesd_exactly(tomesd_merge, case, ratio):
    B, h, w, C, sx, sy, rand = case
    torch.manual_seed(0)
    x = torch.randn(B, h * w, C)
    (m_ref, u_ref), (m, u) = _pair(tomesd_merge, x, h, w, sx, sy, rand, int(h * w * ratio))
    merged = m(x)
    assert torch.equal(merged, m_ref(x))  # same tokens chosen, same order, same means
    y = torch.randn_like(merged)
    assert torch.equal(u(y), u_ref(y))


def test_bf16_means_are_summed_in_fp32(tomesd_merge):
    """tomesd averages in bf16; ours sums in fp32 and rounds once: at least as close to fp32."""
    torch.manual_seed(1)
    x = torch.randn(2, 32 * 32, 128)
    (m32, _), _ = _pair(tomesd_merge, x, 32, 32, 2, 2, True, 512)
    exact = m32(x)
    (m_ref, u_ref), (m, u) = _pair(tomesd_merge, x.bfloat16(), 32, 32, 2, 2, True, 512)
    err_ours = (m(x.bfloat16()).float() - exact).abs().max()
    err_ref = (m_ref(x.bfloat16()).float() - exact).abs().max()
    assert err_ours <= err_ref
    y = torch.randn(2, 512, 128).bfloat16()
    assert torch.equal(u(y), u_ref(y))


def test_unmerge_gives_each_token_its_group_mean():
    """Merged then unmerged, every token carries the mean of the tokens merged with it, and the
    per-token sum over the sequence is kept (each group's mean counted once per member)."""
    torch.manual_seed(2)
    x = torch.randn(2, 16 * 16, 8, dtype=torch.float64)
    m, u = bipartite_merge(x, 16, 16, 2, 2, 100, generator=torch.Generator().manual_seed(0))
    back = u(m(x))
    torch.testing.assert_close(back.sum(1), x.sum(1))
    unchanged = (back == x).all(-1).sum(-1)  # at least the 92 sources left unmerged come back as they were
    assert (unchanged >= 256 - 64 - 100).all() and (unchanged < 256).all()


def test_r_zero_and_r_past_the_sources():
    x = torch.randn(1, 64, 4)
    m, u = bipartite_merge(x, 8, 8, 2, 2, 0)
    assert m(x) is x and u(x) is x
    m, u = bipartite_merge(x, 8, 8, 2, 2, 1000)  # clamped to the 48 sources
    assert m(x).shape == (1, 16, 4)
    assert u(m(x)).shape == x.shape


def test_same_seed_same_choice_other_seed_other_choice():
    torch.manual_seed(4)
    x = torch.randn(2, 256, 16)
    runs = [bipartite_merge(x, 16, 16, 2, 2, 128, generator=torch.Generator().manual_seed(s))[0](x) for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
