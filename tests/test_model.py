import pytest
import torch

from vit import manual as manual_vit
from vit.model import MultiHeadAttention, ViT

CIFAR = dict(in_channels=3, patch_size=4, emb_size=64, img_size=32, depth=12, n_classes=10)
SMALL = dict(in_channels=3, patch_size=8, emb_size=32, img_size=32, depth=2, n_classes=10, num_heads=4)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            m.fused = fused


def test_parameter_counts():
    base = ViT()
    assert n_params(base) == 86_567_656
    assert n_params(ViT(**CIFAR)) == 607_946
    # The manual's torchsummary prints 86,415,592: it leaves out the class token and the position table.
    embedding = base[0]
    assert n_params(base) - embedding.cls_token.numel() - embedding.positions.numel() == 86_415_592


@pytest.mark.parametrize("seed_attention", [False, True])
def test_sdpa_and_plain_paths_agree(seed_attention):
    torch.manual_seed(0)
    model = ViT(**SMALL, seed_attention=seed_attention).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        set_fused(model, False)
        plain = model(x)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)


def test_attention_scales_scores_before_softmax():
    torch.manual_seed(0)
    attn = MultiHeadAttention(emb_size=32, num_heads=4).eval()
    x = torch.randn(2, 5, 32)
    q, k, v = attn.qkv(x).view(2, 5, 4, 8, 3).permute(4, 0, 2, 1, 3)  # b n (h d qkv) -> qkv b h n d
    att = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    expected = attn.projection((att @ v).permute(0, 2, 1, 3).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-4)


def test_seed_attention_gives_the_manuals_outputs():
    torch.manual_seed(0)
    reference = manual_vit.ViT(**CIFAR).eval()
    ours = ViT(**CIFAR, seed_attention=True).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-4)
        set_fused(ours, False)
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-4)
        fixed = ViT(**CIFAR).eval()
        fixed.load_state_dict(reference.state_dict())
        assert not torch.allclose(fixed(x), reference(x), atol=1e-3)


def test_state_dict_keys_are_the_manuals():
    for kwargs in (CIFAR, {}):
        reference = manual_vit.ViT(**kwargs).state_dict()
        ours = ViT(**kwargs).state_dict()
        assert list(ours) == list(reference)
        assert all(ours[k].shape == reference[k].shape for k in ours)


@pytest.mark.parametrize("fused", [True, False])
def test_mask_really_masks(fused):
    torch.manual_seed(0)
    attn = MultiHeadAttention(emb_size=32, num_heads=4, fused=fused).eval()
    x = torch.randn(2, 6, 32)
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[:, 5] = False  # nobody attends to token 5
    changed = x.clone()
    changed[:, 5] = torch.randn(2, 32) * 10
    out, out_changed = attn(x, mask=mask), attn(changed, mask=mask)
    torch.testing.assert_close(out[:, :5], out_changed[:, :5])
    assert not torch.allclose(attn(x)[:, :5], attn(changed)[:, :5])


def test_manuals_mask_code_is_broken():
    attn = manual_vit.MultiHeadAttention(emb_size=32, num_heads=4)
    with pytest.raises(AttributeError, match="mask_fill"):
        attn(torch.randn(1, 3, 32), mask=torch.ones(3, 3, dtype=torch.bool))


def test_plain_path_keeps_attention_for_inspection():
    model = ViT(**SMALL).eval()
    for m in model.attention_modules():
        m.keep_attention = True
    model(torch.randn(2, 3, 32, 32))
    att = model.attention_modules()[0].last_attention
    assert att.shape == (2, 4, 17, 17)  # b h q k: 16 patches + class token
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 4, 17))


@pytest.mark.parametrize(
    "kwargs, numbers",
    [
        (dict(img_size=30, patch_size=4), ["img_size=30", "patch_size=4"]),
        (dict(emb_size=64, num_heads=6), ["emb_size=64", "num_heads=6"]),
        (dict(depth=0), ["depth", "0"]),
        (dict(n_classes=0), ["n_classes", "0"]),
    ],
)
def test_bad_shapes_fail_at_construction(kwargs, numbers):
    with pytest.raises(ValueError) as info:
        ViT(**{**CIFAR, **kwargs})
    for text in numbers:
        assert text in str(info.value)


def test_wrong_input_size_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(3, 32, 32\).*\(3, 64, 64\)"):
        ViT(**SMALL)(torch.randn(1, 3, 64, 64))


def test_new_options_default_to_the_manuals_model():
    torch.manual_seed(0)
    plain = ViT(**CIFAR)
    torch.manual_seed(0)
    explicit = ViT(**CIFAR, pool="mean", pos_init="randn", dynamic_img_size=False)
    for (name, a), (_, b) in zip(plain.state_dict().items(), explicit.state_dict().items()):
        assert torch.equal(a, b), name
    assert plain[0].positions.std() > 0.5  # the manual's N(0, 1)


def test_pos_init_trunc_normal_draws_small_positions():
    embedding = ViT(**SMALL, pos_init="trunc_normal")[0]
    for table in (embedding.positions, embedding.cls_token):
        assert 0.01 < table.std() < 0.03 and table.abs().max() <= 0.04 + 1e-6
    with pytest.raises(ValueError, match="pos_init must be one of randn, trunc_normal, sincos"):
        ViT(**SMALL, pos_init="zeros")


def test_pos_init_sincos_codes_rows_and_columns():
    embedding = ViT(**{**SMALL, "patch_size": 4}, pos_init="sincos")[0]
    codes = embedding.positions[1:].detach().view(8, 8, 32)  # grid 8 x 8, emb 32
    rows, cols = codes[..., :16], codes[..., 16:]
    assert torch.allclose(rows[2, 0], rows[2, 7]) and not torch.allclose(rows[2, 0], rows[3, 0])  # the row half ignores the column
    assert torch.allclose(cols[0, 5], cols[6, 5]) and not torch.allclose(cols[0, 5], cols[0, 6])
    assert torch.equal(rows[0, 0][:8], torch.zeros(8)) and torch.equal(rows[0, 0][8:], torch.ones(8))  # sin 0, cos 0
    assert len({tuple(v.tolist()) for v in codes.view(64, 32)}) == 64  # every patch its own code


def test_cls_pool_reads_the_class_token_only():
    torch.manual_seed(0)
    model = ViT(**SMALL, pool="cls").eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = model[1](model[0](x))
    head = model[2]
    torch.testing.assert_close(model(x), head[2](head[1](tokens[:, 0])))
    mean_model = ViT(**SMALL, pool="mean").eval()
    mean_model.load_state_dict(model.state_dict())
    assert not torch.allclose(mean_model(x), model(x))
    with pytest.raises(ValueError, match="pool must be one of mean, cls"):
        ViT(**SMALL, pool="max")


def test_dynamic_img_size_resamples_positions_and_keeps_the_full_size_exact():
    torch.manual_seed(0)
    fixed = ViT(**{**SMALL, "patch_size": 4}).eval()
    dynamic = ViT(**{**SMALL, "patch_size": 4}, dynamic_img_size=True).eval()
    dynamic.load_state_dict(fixed.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dynamic(x), fixed(x))  # same weights, full size: the same function
    assert dynamic(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    embedding = dynamic[0]
    resampled = embedding.resampled_positions(4, 4)
    assert resampled.shape == (1 + 16, 32) and torch.equal(resampled[0], embedding.positions[0])
    # a position table that is constant over the grid stays constant when resampled
    with torch.no_grad():
        embedding.positions[1:] = 0.5
    torch.testing.assert_close(embedding.resampled_positions(6, 6)[1:], torch.full((36, 32), 0.5))
    with pytest.raises(ValueError, match="divisible by 4"):
        dynamic(torch.randn(1, 3, 18, 18))
    with pytest.raises(ValueError, match=r"\(3, 32, 32\)"):
        fixed(torch.randn(1, 3, 16, 16))


def test_conv_stem_keeps_the_token_grid_and_mixes_neighbouring_pixels():
    torch.manual_seed(0)
    model = ViT(**{**SMALL, "patch_size": 4}, stem_channels=[8, 16], dynamic_img_size=True).eval()
    embedding = model[0]
    tokens = embedding(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 1 + 8 * 8, 32)  # the same grid as a plain patch-4 embedding
    assert [m.stride for m in embedding.projection if isinstance(m, torch.nn.Conv2d)] == [(2, 2), (2, 2), (1, 1)]
    # overlapping 3x3 filters: changing one pixel changes the tokens of the neighbouring patch too (a plain
    # patch embedding changes only its own)
    x = torch.randn(1, 3, 32, 32)
    moved = x.clone()
    moved[0, :, 3, 3] += 1.0  # the last pixel of patch (0, 0)
    changed = (embedding(moved) - embedding(x)).abs().sum(-1)[0, 1:].view(8, 8) > 1e-6
    assert changed[0, 0] and changed[0, 1] and changed[1, 1] and not changed[4, 4]
    plain = ViT(**{**SMALL, "patch_size": 4}).eval()[0]
    changed = (plain(moved) - plain(x)).abs().sum(-1)[0, 1:].view(8, 8) > 1e-6
    assert changed.sum() == 1
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"patch_size=4 must be divisible by the product of their strides \(8\)"):
        ViT(**{**SMALL, "patch_size": 4}, stem_channels=[8, 8, 8])
    with pytest.raises(ValueError, match="stem_channels must be positive integers"):
        ViT(**SMALL, stem_channels=[0])


def test_stride_one_stem_conv_filters_at_full_resolution_on_the_same_grid():
    model = ViT(**{**SMALL, "patch_size": 4}, stem_channels=[4, 8, 16], stem_strides=[1, 2, 2], dynamic_img_size=True).eval()
    embedding = model[0]
    assert [m.stride for m in embedding.projection if isinstance(m, torch.nn.Conv2d)] == [(1, 1), (2, 2), (2, 2), (1, 1)]
    assert embedding(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 8 * 8, 32)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    # three stride-2 convs would need patch 8; with the first at stride 1, patch 4 takes them
    ViT(**{**SMALL, "patch_size": 4}, stem_channels=[8, 8, 8], stem_strides=[2, 1, 2])
    with pytest.raises(ValueError, match=r"stem_strides must give a stride of 1 or 2 for each of the 2 stem_channels"):
        ViT(**SMALL, stem_channels=[8, 8], stem_strides=[1])
    with pytest.raises(ValueError, match=r"stem_strides must give a stride of 1 or 2"):
        ViT(**SMALL, stem_channels=[8], stem_strides=[3])


def test_empty_stem_is_the_manuals_embedding():
    torch.manual_seed(0)
    plain = ViT(**CIFAR)
    torch.manual_seed(0)
    explicit = ViT(**CIFAR, stem_channels=[])
    assert list(plain.state_dict()) == list(explicit.state_dict())
    for (name, a), b in zip(plain.state_dict().items(), explicit.state_dict().values()):
        assert torch.equal(a, b), name


def test_manual_recipe_trains_and_tests_the_manuals_own_model():
    torch.manual_seed(0)
    recipe = manual_vit.Recipe.set_up(*manual_vit.datasets(None, fake_sizes=(64, 32)), torch.device("cpu"), batch_size=16)
    assert type(recipe.model) is manual_vit.ViT and n_params(recipe.model) == 607_946
    before = [p.detach().clone() for p in recipe.model.parameters()]
    seen = []
    loss = recipe.train_epoch(lambda i: seen.append(i) or i < 2)  # two steps, then stop
    assert seen == [0, 1, 2] and loss > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, recipe.model.parameters()))
    assert 0 <= recipe.test() <= 100
    ticks = iter(range(100))
    assert recipe.time_slice(1, 2, lambda: float(next(ticks))) == (0.0, 1.0)  # read before step 1 and before step 3
    assert recipe.time_slice(3, 2, lambda: 0.0) is None  # 4 steps an epoch: too few
