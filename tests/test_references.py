"""The references (omniret_kernels/reference.py) against small cases worked by hand from the paper's equations,
and against torch.autograd.gradcheck in float64."""
import math

import pytest
import torch

from omniret_kernels import reference as ref

D64 = dict(dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------- ASWP
def _aswp_hand_case():
    # tokens (1, 0) and (0, 3); directions e1 and 2*e2 (normalised to e2); references per column.
    x = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]], **D64)
    directions = torch.tensor([[1.0, 0.0], [0.0, 2.0]], **D64)
    references = torch.tensor([[-1.0, 5.0], [1.0, 0.0]], **D64)
    # column 0: projections (1, 0) sorted (0, 1); ranks of (-1, 1) are (0, 1): psi = (0 + 1, 1 - 1) = (1, 0)
    # column 1: projections (0, 3) sorted (0, 3); ranks of (5, 0) are (1, 0): psi = (3 - 5, 0 - 0) = (-2, 0)
    return x, directions, references


@pytest.mark.parametrize(
    "pooling, expected",
    [("max", [1.0, 0.0]), ("stm", [1.0, 0.0]), ("mean", [0.5, -1.0]), ("weighted", [1.0, -4.0])],
)
def test_aswp_hand_case(pooling, expected):
    x, directions, references = _aswp_hand_case()
    weights = torch.tensor([[1.0, 2.0], [3.0, 4.0]], **D64)
    out = ref.aswp_pool(x, directions, references, pooling=pooling, weights=weights)
    torch.testing.assert_close(out, torch.tensor([expected], **D64))


def test_aswp_without_normalisation_scales_projections():
    x, directions, references = _aswp_hand_case()
    out = ref.aswp_pool(x, directions, references, pooling="max", normalize_directions=False)
    # column 1 projections become (0, 6): psi = (6 - 5, 0 - 0) = (1, 0)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0]], **D64))


def test_aswp_quantile_interpolation_when_n_differs_from_m():
    # n = 3 valid tokens (one masked out), M = 2 references: t = (r + 0.5) * 3 / 2 - 0.5 -> 0.25 and 1.75
    x = torch.tensor([[[2.0], [0.0], [100.0], [1.0]]], **D64)
    mask = torch.tensor([[True, True, False, True]])
    directions = torch.ones(1, 1, **D64)
    references = torch.tensor([[0.5], [-0.5]], **D64)  # ranks (1, 0)
    s = [0.0, 1.0, 2.0]
    matched_j0 = s[1] * 0.25 + s[2] * 0.75  # rank 1 -> t = 1.75
    matched_j1 = s[0] * 0.75 + s[1] * 0.25  # rank 0 -> t = 0.25
    out = ref.aswp_pool(x, directions, references, mask, pooling="mean")
    expected = ((matched_j0 - 0.5) + (matched_j1 + 0.5)) / 2
    torch.testing.assert_close(out, torch.tensor([[expected]], **D64))


def test_quantile_positions_equal_sizes_are_the_ranks():
    ranks = torch.randperm(7).unsqueeze(1)
    lo, hi, w = ref.quantile_positions(ranks, 7, 7)
    assert torch.equal(lo, ranks) and torch.all(w.abs() < 1e-12)


def test_reference_ranks_break_ties_by_index():
    references = torch.tensor([[0.0], [0.0], [-1.0]])
    assert ref.reference_ranks(references).flatten().tolist() == [1, 2, 0]


def test_stm_gradient_matches_the_spec_formula():
    torch.manual_seed(1)
    psi = torch.randn(2, 5, 3, **D64, requires_grad=True)
    g = torch.randn(2, 3, **D64)
    temperature = 0.7
    out = ref._stm_pool(psi, temperature)
    torch.testing.assert_close(out, psi.max(dim=-2).values)
    (grad,) = torch.autograd.grad(out, psi, g)
    y = torch.softmax(psi / temperature, dim=-2)
    hard = torch.nn.functional.one_hot(psi.argmax(dim=-2), 5).transpose(-1, -2).to(psi.dtype)
    mean = (y * psi).sum(dim=-2, keepdim=True)
    expected = g.unsqueeze(-2) * (hard + y * (psi - mean) / temperature)
    torch.testing.assert_close(grad, expected.detach())


# "stm" is left out on purpose: its gradient is the straight-through estimator, not the derivative of its forward
# (max); test_stm_gradient_matches_the_spec_formula checks it instead.
@pytest.mark.parametrize("pooling", ["max", "mean", "weighted"])
def test_aswp_gradcheck(pooling):
    torch.manual_seed(2)
    x = torch.randn(2, 5, 3, **D64, requires_grad=True)
    directions = torch.randn(4, 3, **D64, requires_grad=True)
    references = torch.randn(3, 4, **D64, requires_grad=True)
    weights = torch.randn(3, 4, **D64, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, False, True, True, False]])

    def f(x, directions, references, weights):
        return ref.aswp_pool(x, directions, references, mask, pooling=pooling, weights=weights, temperature=0.9)

    assert torch.autograd.gradcheck(f, (x, directions, references, weights))


def test_aswp_empty_sample_raises():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="no valid token"):
        ref.aswp_pool(x, torch.randn(5, 4), torch.randn(3, 5), torch.tensor([[True] * 3, [False] * 3]))


# ---------------------------------------------------------------------------------------------------- resampler
def test_resampler_attention_hand_case():
    # one query, d = 1, scale 1: keys (0, ln 3) give weights (1/4, 3/4); values (4, 8) -> 7.
    # A second sample with one key attends to it fully. Two query heads share the one k/v head (GQA).
    q = torch.ones(2, 2, 1, 1, **D64)
    k = torch.tensor([[[0.0]], [[math.log(3.0)]], [[5.0]]], **D64)
    v = torch.tensor([[[4.0]], [[8.0]], [[-2.0]]], **D64)
    cu = torch.tensor([0, 2, 3], dtype=torch.int32)
    out = ref.resampler_attention(q, k, v, cu, scale=1.0)
    expected = torch.tensor([7.0, 7.0, -2.0, -2.0], **D64).reshape(2, 2, 1, 1)
    torch.testing.assert_close(out, expected)


def test_resampler_attention_ignores_other_samples_keys():
    torch.manual_seed(3)
    q = torch.randn(2, 4, 3, 8, **D64)
    k, v = torch.randn(9, 2, 8, **D64), torch.randn(9, 2, 8, **D64)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    both = ref.resampler_attention(q, k, v, cu)
    alone = ref.resampler_attention(q[1:], k[4:], v[4:], torch.tensor([0, 5], dtype=torch.int32))
    torch.testing.assert_close(both[1:], alone)


def test_resampler_attention_gradcheck():
    torch.manual_seed(4)
    q = torch.randn(2, 4, 3, 5, **D64, requires_grad=True)
    k = torch.randn(7, 2, 5, **D64, requires_grad=True)
    v = torch.randn(7, 2, 5, **D64, requires_grad=True)
    cu = torch.tensor([0, 1, 7], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda q, k, v: ref.resampler_attention(q, k, v, cu), (q, k, v))


def test_resampler_attention_empty_sample_raises():
    with pytest.raises(ValueError, match="no keys"):
        ref.resampler_attention(torch.randn(2, 1, 1, 4), torch.randn(3, 1, 4), torch.randn(3, 1, 4),
                                torch.tensor([0, 3, 3], dtype=torch.int32))


# ---------------------------------------------------------------------------------------------------- diversity
def _diversity_hand_case():
    # tokens (1, 0), (2, 0), (0, 1): relu(U U^T) - I has ones at (0, 1) and (1, 0) and zeros elsewhere.
    return torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]], **D64)


def test_diversity_hand_case_without_dropout():
    # smoothL1_0.5(1) = 1 - 0.25 = 0.75, twice, over N^2 = 9
    torch.testing.assert_close(ref.diversity_loss(_diversity_hand_case(), gamma=0.5), torch.tensor(1.5 / 9, **D64))


def test_diversity_hand_case_with_keep_mask():
    keep = torch.ones(1, 3, 3, dtype=torch.bool)
    keep[0, 0, 1] = False
    # p = 0.5: the kept (1, 0) entry is scaled to 2: smoothL1_0.5(2) = 1.75
    out = ref.diversity_loss(_diversity_hand_case(), keep, p=0.5, gamma=0.5)
    torch.testing.assert_close(out, torch.tensor(1.75 / 9, **D64))


def test_diversity_quadratic_branch_and_no_normalisation():
    m = torch.tensor([[[0.1, 0.0], [0.2, 0.0]]], **D64)  # <u0, u1> = 0.02 without normalisation
    out = ref.diversity_loss(m, gamma=0.5, normalize=False)
    # diagonal: relu(0.01) - 1 = -0.99 and relu(0.04) - 1 = -0.96, both |x| >= gamma
    expected = (2 * 0.5 * 0.02 ** 2 / 0.5 + (0.99 - 0.25) + (0.96 - 0.25)) / 4
    torch.testing.assert_close(out, torch.tensor(expected, **D64))


def test_diversity_gradcheck():
    torch.manual_seed(5)
    m = torch.randn(2, 4, 3, **D64, requires_grad=True)
    keep = torch.rand(2, 4, 4) > 0.5
    assert torch.autograd.gradcheck(lambda m: ref.diversity_loss(m, keep, p=0.5, gamma=0.3), (m,))


# ---------------------------------------------------------------------------------------------------- losses
def test_infonce_hand_case():
    tau = 0.5
    q = torch.eye(2, **D64)
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], **D64)  # an extra hard negative after the positives
    phi = ref.cosine_logits(q, c, tau)
    expected = []
    for i in range(2):
        neg = [j for j in range(3) if j != i]
        w = [2 * math.exp(0.5 * phi[i, j].item()) / sum(math.exp(0.5 * phi[i, k].item()) for k in neg) for j in neg]
        denom = math.exp(phi[i, i].item()) + sum(wj * math.exp(phi[i, j].item()) for wj, j in zip(w, neg))
        expected.append(-math.log(math.exp(phi[i, i].item()) / denom))
    out = ref.hn_infonce_loss(q, c, tau=tau, beta=0.5)
    torch.testing.assert_close(out, torch.tensor(sum(expected) / 2, **D64))


def test_infonce_beta_zero_is_plain_infonce():
    torch.manual_seed(6)
    q, c = torch.randn(5, 8, **D64), torch.randn(7, 8, **D64)
    logits = ref.cosine_logits(q, c, 0.07)
    plain = torch.nn.functional.cross_entropy(logits, torch.arange(5))
    torch.testing.assert_close(ref.hn_infonce_loss(q, c, beta=0.0), plain)


def test_infonce_masks_extra_positives():
    torch.manual_seed(7)
    q, c = torch.randn(3, 4, **D64), torch.randn(4, 4, **D64)
    positives = torch.zeros(3, 4, dtype=torch.bool)
    positives[0, 3] = True  # candidate 3 is also relevant to query 0
    masked, unmasked = ref.hn_infonce_loss(q, c, positives=positives), ref.hn_infonce_loss(q, c)
    # only query 0's term changes, to the loss it has when candidate 3 is not in the batch at all
    change = ref.hn_infonce_loss(q[:1], c[:3]) - ref.hn_infonce_loss(q[:1], c)
    assert abs(change.item()) > 1e-6
    torch.testing.assert_close(3 * (masked - unmasked), change)


def test_triplet_hand_case():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], **D64)
    c = torch.tensor([[1.0, 0.0], [0.6, 0.8]], **D64)
    # tau = 1, margin 0.5: query 0: max(0, 0.5 + 0.6 - 1) = 0.1; query 1: max(0, 0.5 + 0 - 0.8) = 0
    out = ref.triplet_loss(q, c, tau=1.0, margin=0.5)
    torch.testing.assert_close(out, torch.tensor(0.05, **D64))


def test_losses_gradcheck():
    # with detached hard-negative weights (the default) the gradient is on purpose not the full derivative,
    # so the check runs with the weights kept in the graph
    torch.manual_seed(8)
    q = torch.randn(3, 4, **D64, requires_grad=True)
    c = torch.randn(5, 4, **D64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, c: ref.hn_infonce_loss(q, c, tau=0.5, detach_weights=False), (q, c))
    assert torch.autograd.gradcheck(lambda q, c: ref.triplet_loss(q, c, tau=0.5, margin=2.0), (q, c))
