"""SharedMediaResampler and video_to_tokens: packing invariance, modality latents, trilinear reduction."""
import pytest
import torch

from omniret_kernels import SharedMediaResampler, pack_media, video_to_tokens

pytestmark = pytest.mark.filterwarnings("ignore:resampler_attention. no fast backend")


def _module(**kw):
    args = dict(dim=24, num_latents=5, depth=2, heads=4, kv_heads=2)
    args.update(kw)
    return SharedMediaResampler(**args).double()


@pytest.mark.parametrize("kv_include_latents", [True, False])
def test_output_does_not_depend_on_packing(kv_include_latents):
    m = _module(kv_include_latents=kv_include_latents)
    samples = [torch.randn(n, 24, dtype=torch.float64) for n in (7, 1, 13, 3)]
    batched = m(samples, modality="audio")
    assert batched.shape == (4, 5, 24)
    for i, s in enumerate(samples):
        alone = m([s], modality="audio")
        torch.testing.assert_close(alone[0], batched[i], rtol=1e-10, atol=1e-10)
    # packed tensor + cu_seqlens is the same call as the list
    packed, cu = pack_media(samples)
    torch.testing.assert_close(m(packed, cu, "audio"), batched, rtol=0, atol=0)


def test_output_depends_on_each_samples_own_tokens_only():
    m = _module()
    a, b = torch.randn(6, 24, dtype=torch.float64), torch.randn(9, 24, dtype=torch.float64)
    out1 = m([a, b], modality="image")
    out2 = m([a, b + torch.randn_like(b)], modality="image")  # LayerNorm would erase a constant shift
    torch.testing.assert_close(out1[0], out2[0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out1[1], out2[1])


def test_equal_length_3d_input_matches_list():
    m = _module()
    x = torch.randn(3, 8, 24, dtype=torch.float64)
    torch.testing.assert_close(m(x, modality="video"), m(list(x), modality="video"), rtol=1e-12, atol=1e-12)


def test_modality_latents_change_output_and_add_modality_copies():
    m = _module()
    x = [torch.randn(10, 24, dtype=torch.float64)]
    assert not torch.allclose(m(x, modality="image"), m(x, modality="audio"))
    m.add_modality("depth", init_from="image")
    torch.testing.assert_close(m(x, modality="depth"), m(x, modality="image"), rtol=0, atol=0)
    # a copy, not a shared parameter
    assert m.modality_latents["depth"].data_ptr() != m.modality_latents["image"].data_ptr()
    with pytest.raises(ValueError, match="already exists"):
        m.add_modality("image")
    with pytest.raises(ValueError, match="init_from"):
        m.add_modality("x", init_from="nope")
    with pytest.raises(ValueError, match="modality"):
        m(x, modality="smell")


def test_no_modalities_uses_shared_latents():
    m = _module(modalities=())
    out = m([torch.randn(4, 24, dtype=torch.float64)])
    assert out.shape == (1, 5, 24) and torch.isfinite(out).all()


def test_gradients_reach_all_parameters():
    m = _module()
    out = m([torch.randn(n, 24, dtype=torch.float64) for n in (3, 11)], modality="audio")
    out.square().sum().backward()
    for name, p in m.named_parameters():
        if name.startswith("modality_latents.") and not name.endswith("audio"):
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_inputs_raise_value_errors():
    m = _module()
    with pytest.raises(ValueError, match="no tokens"):
        m([torch.randn(0, 24, dtype=torch.float64)], modality="image")
    with pytest.raises(ValueError, match="media"):
        m(torch.randn(5, 23, dtype=torch.float64), torch.tensor([0, 5], dtype=torch.int32), "image")
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(torch.randn(5, 24, dtype=torch.float64), torch.tensor([0, 3, 2, 5], dtype=torch.int32), "image")
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(torch.randn(5, 24, dtype=torch.float64), None, "image")
    with pytest.raises(ValueError, match="heads"):
        SharedMediaResampler(24, heads=4, kv_heads=3)


def _trilinear_reference(features, grid):
    """Separable linear interpolation (align_corners=False) along frames, then height, then width."""
    def resize(x, axis, size):
        n = x.shape[axis]
        pos = ((torch.arange(size, dtype=torch.float64) + 0.5) * n / size - 0.5).clamp(min=0)
        lo = pos.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        w = (pos - lo).view([-1 if i == axis else 1 for i in range(x.dim())])
        return x.index_select(axis, lo) * (1 - w) + x.index_select(axis, hi) * w
    x = features
    for axis, size in enumerate(grid):
        x = resize(x, axis, size)
    return x.reshape(-1, features.shape[-1])


@pytest.mark.parametrize("grid", [(2, 3, 3), (4, 5, 5), (1, 1, 1), (6, 2, 7)])
def test_video_to_tokens_matches_separable_trilinear(grid):
    f = torch.randn(5, 6, 7, 3, dtype=torch.float64)
    torch.testing.assert_close(video_to_tokens(f, grid), _trilinear_reference(f, grid))


def test_video_to_tokens_layouts():
    f = torch.randn(4, 9, 2, dtype=torch.float32)  # (frames, P = 3 * 3, dim)
    out = video_to_tokens(f, (2, 2, 2))
    torch.testing.assert_close(out, video_to_tokens(f.view(4, 3, 3, 2), (2, 2, 2)))
    batch = torch.randn(2, 4, 3, 3, 2)
    torch.testing.assert_close(video_to_tokens(batch, (2, 2, 2))[1], video_to_tokens(batch[1], (2, 2, 2)))
    # identity grid returns the frames unchanged, frame-major then row-major
    torch.testing.assert_close(video_to_tokens(batch[0], (4, 3, 3)), batch[0].reshape(-1, 2))
    with pytest.raises(ValueError, match="square"):
        video_to_tokens(torch.randn(4, 8, 2), (2, 2, 2))
    with pytest.raises(ValueError, match="grid"):
        video_to_tokens(f, (2, 2))


@pytest.mark.parametrize("backend", [None, "cpu"])
def test_module_on_fast_backend_matches_reference_backend(backend):
    from omniret_kernels import _ext

    if not _ext.has_kernel("resampler_attention_fwd", "CPU"):
        pytest.skip("CPU extension not built")
    fast = SharedMediaResampler(32, num_latents=6, depth=2, heads=4, kv_heads=2, backend=backend)
    ref = SharedMediaResampler(32, num_latents=6, depth=2, heads=4, kv_heads=2, backend="reference")
    ref.load_state_dict(fast.state_dict())
    media = [torch.randn(n, 32) for n in (5, 40, 1, 300)]
    outs = []
    for m in (fast, ref):
        out = m(media, modality="audio")
        out.square().sum().backward()
        outs.append((out.detach(), [p.grad for p in m.parameters() if p.grad is not None]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    assert len(outs[0][1]) == len(outs[1][1])
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
