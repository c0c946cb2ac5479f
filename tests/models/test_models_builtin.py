"""Built-in architectures: shapes, fx tracing, final Linear, hook-friendliness, errors."""

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from flipsafe.errors import ConfigError, UnknownNameError
from flipsafe.models import ARCHITECTURES, build

# Digits-like and CIFAR-like inputs, plus the two mixed combinations.
GEOMETRIES = [(1, 8), (3, 32), (3, 8), (1, 32)]
ALLOWED_LEAVES = (
    nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.GELU, nn.LayerNorm,
    nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Softmax,
)


def linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_architecture_names():
    assert set(ARCHITECTURES) == {
        "mlp", "lenet", "resnet20", "resnet18", "vgg11_bn", "mobilenetv2", "vit_tiny"
    }


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("channels,size", GEOMETRIES)
def test_forward_shape_and_fx_trace(arch, channels, size):
    torch.manual_seed(0)
    model = build(arch, 7, in_channels=channels, image_size=size).eval()
    x = torch.randn(3, channels, size, size)
    with torch.no_grad():
        out = model(x)
        traced = torch.fx.symbolic_trace(model)(x)
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(traced, out)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_final_linear_produces_logits(arch):
    model = build(arch, 5, in_channels=1, image_size=8).eval()
    _, last = linears(model)[-1]
    assert last.out_features == 5
    seen = {}
    last.register_forward_hook(lambda m, i, o: seen.update(out=o))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = model(x)
    # The logits are exactly the last Linear's output: nothing runs after it.
    assert torch.equal(seen["out"], out)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hook_friendly_modules(arch):
    model = build(arch, 10, in_channels=3, image_size=32).eval()
    calls = {}
    for name, module in model.named_modules():
        if not list(module.children()):
            assert isinstance(module, ALLOWED_LEAVES), f"{name}: {type(module).__name__}"
            assert not getattr(module, "inplace", False), f"{name} is inplace"
            module.register_forward_hook(
                lambda m, i, o, n=name: calls.update({n: calls.get(n, 0) + 1})
            )
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    # A module reused twice in one forward would make a hook fire twice and
    # attribute two different tensors to one layer name.
    assert calls and max(calls.values()) == 1
    leaves_with_params = {n for n, m in model.named_modules()
                          if not list(m.children()) and list(m.parameters(recurse=False))}
    assert leaves_with_params <= set(calls), "a parameterised module never ran"


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet20_parameter_count():
    # Hand count with 1x1-conv projection shortcuts: stem 432+32; stage1 3*4672;
    # stage2 14528+2*18560; stage3 57728+2*73984; fc 64*10+10.
    assert param_count(build("resnet20", 10)) == 272474


def test_resnet18_is_cifar_style():
    model = build("resnet18", 10, in_channels=3, image_size=32)
    # Published parameter count of the CIFAR ResNet-18 (3x3 stem, no max-pool).
    assert param_count(model) == 11173962
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.kernel_size == (3, 3) and first_conv.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    widths = [m.out_channels for n, m in model.named_modules()
              if isinstance(m, nn.Conv2d) and n.endswith("conv2")]
    assert widths == [64, 64, 128, 128, 256, 256, 512, 512]


@pytest.mark.parametrize("arch,size,side", [
    ("resnet18", 32, 4), ("resnet20", 32, 8), ("mobilenetv2", 32, 4), ("mobilenetv2", 8, 1),
    ("vgg11_bn", 32, 1), ("vgg11_bn", 8, 1), ("vgg11_bn", 16, 1),
])
def test_last_feature_map_size(arch, size, side):
    model = build(arch, 10, in_channels=3, image_size=size).eval()
    pool = next(m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d))
    seen = {}
    pool.register_forward_hook(lambda m, i, o: seen.update(map=i[0]))
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    assert seen["map"].shape[-2:] == (side, side)


@pytest.mark.parametrize("size,pools", [(8, 3), (16, 4), (32, 5), (64, 5), (2, 1)])
def test_vgg_uses_the_pools_the_size_allows(size, pools):
    model = build("vgg11_bn", 10, in_channels=3, image_size=size)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == pools
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 8


@pytest.mark.parametrize("size,patch", [(32, 4), (8, 2), (16, 2), (64, 8)])
def test_vit_patches_and_size(size, patch):
    model = build("vit_tiny", 10, in_channels=3, image_size=size)
    conv = model.patch_embed
    assert conv.kernel_size == (patch, patch) and conv.stride == (patch, patch)
    dim = conv.out_channels
    assert 64 <= dim <= 192
    assert 4 <= len(model.blocks) <= 6
    assert model.pos_embed.shape == (1, (size // patch) ** 2 + 1, dim)


def test_vit_attention_matches_reference():
    torch.manual_seed(0)
    attn = build("vit_tiny", 10).blocks[0].attn
    x = torch.randn(2, 5, attn.q.in_features)
    heads = attn.heads

    def split(t):
        return t.reshape(2, 5, heads, -1).transpose(1, 2)

    q, k, v = (split(F.linear(x, lin.weight, lin.bias)) for lin in (attn.q, attn.k, attn.v))
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, -1)
    ref = F.linear(ref, attn.proj.weight, attn.proj.bias)
    torch.testing.assert_close(attn(x), ref)


def test_vit_block_matches_torch_transformer_layer():
    torch.manual_seed(0)
    block = build("vit_tiny", 10).blocks[0].eval()
    dim, hidden = block.attn.q.in_features, block.mlp[0].out_features
    ref = nn.TransformerEncoderLayer(dim, block.attn.heads, hidden, dropout=0.0,
                                     activation="gelu", layer_norm_eps=1e-6,
                                     batch_first=True, norm_first=True).eval()
    a = block.attn
    with torch.no_grad():
        for norm in (block.norm1, block.norm2):  # non-trivial LayerNorm affine
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        ref.self_attn.in_proj_weight.copy_(torch.cat([a.q.weight, a.k.weight, a.v.weight]))
        ref.self_attn.in_proj_bias.copy_(torch.cat([a.q.bias, a.k.bias, a.v.bias]))
        ref.self_attn.out_proj.load_state_dict(a.proj.state_dict())
        ref.linear1.load_state_dict(block.mlp[0].state_dict())
        ref.linear2.load_state_dict(block.mlp[2].state_dict())
        ref.norm1.load_state_dict(block.norm1.state_dict())
        ref.norm2.load_state_dict(block.norm2.state_dict())
        x = torch.randn(2, 17, dim)
        torch.testing.assert_close(block(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_models_can_fit_a_small_batch(arch):
    g = torch.Generator().manual_seed(0)
    # Four fixed random templates plus noise: learnable from content alone.
    templates = torch.randn(4, 1, 8, 8, generator=g)
    y = torch.arange(16) % 4
    x = templates[y] + 0.3 * torch.randn(16, 1, 8, 8, generator=g)
    torch.manual_seed(0)
    model = build(arch, 4, in_channels=1, image_size=8)
    # LeNet keeps PyTorch's default (small) init and needs a larger step.
    opt = torch.optim.Adam(model.parameters(), lr=1e-2 if arch == "lenet" else 1e-3)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Gradients reach the weights and training works: the loss falls well below
    # where it started (about ln 4 = 1.39 for an untrained model).
    assert losses[-1] < 0.6 * losses[0]


def test_unknown_architecture_lists_choices():
    with pytest.raises(UnknownNameError) as err:
        build("resnet1000", 10)
    message = str(err.value)
    assert "resnet1000" in message and "resnet20" in message and "vit_tiny" in message
    with pytest.raises(UnknownNameError, match="torchvision:<name>"):
        build("keras:resnet18", 10)


def test_names_are_case_insensitive():
    assert param_count(build("ResNet20", 10)) == param_count(build("resnet20", 10))


@pytest.mark.parametrize("kwargs,match", [
    ({"num_classes": 1}, "num_classes"),
    ({"num_classes": 0}, "num_classes"),
    ({"num_classes": 2.5}, "num_classes"),
    ({"num_classes": 10, "in_channels": 0}, "in_channels"),
    ({"num_classes": 10, "image_size": 0}, "image_size"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build("mlp", **kwargs)


@pytest.mark.parametrize("arch,too_small", [
    ("resnet18", 4), ("mobilenetv2", 7), ("lenet", 3), ("resnet20", 2), ("vit_tiny", 1)
])
def test_image_too_small(arch, too_small):
    with pytest.raises(ConfigError, match=f"{too_small}x{too_small}"):
        build(arch, 10, image_size=too_small)
