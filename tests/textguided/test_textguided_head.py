"""CosineHead, make_text_guided and locating the classifier layer."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flipsafe.errors import ConfigError, UnknownNameError
from flipsafe.textguided import (
    ClassEmbeddings,
    CosineHead,
    TextGuidedClassifier,
    classifier_layer_name,
    find_final_linear,
    make_text_guided,
)

C, E = 4, 6


def embeddings(c=C, e=E, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ClassEmbeddings([f"class{i}" for i in range(c)], 3 * torch.randn(c, e, generator=g))


class SmallCNN(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.hidden = nn.Linear(16, 12)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv(x))).flatten(1)
        return self.fc(F.relu(self.hidden(x)))


class VGGLike(nn.Module):
    """The classifier is the last entry of a nested Sequential, as in torchvision's VGG."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(192, 20), nn.ReLU(), nn.Dropout(0.0),
                                        nn.Linear(20, 20), nn.ReLU(), nn.Dropout(0.0),
                                        nn.Linear(20, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class ViTLike(nn.Module):
    """Head nested two levels down, followed by a Linear that is not the classifier."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
        self.heads = nn.Module()
        self.heads.head = nn.Linear(16, 10)
        self.aux = nn.Linear(16, 3)

    def forward(self, x):
        return self.heads.head(self.body(x))


class TimmLike(ViTLike):
    def get_classifier(self):
        return self.heads.head


def test_head_starts_at_normalised_embeddings_and_computes_scaled_cosines():
    emb = embeddings()
    head = CosineHead(E, C, emb.vectors)
    expect_w = emb.vectors / torch.linalg.norm(emb.vectors, dim=1, keepdim=True)
    assert torch.allclose(head.fc.weight, expect_w, atol=1e-6)
    assert head.fc.bias is None
    assert head.logit_scale.item() == pytest.approx(math.log(1 / 0.07))

    f = torch.randn(5, E, generator=torch.Generator().manual_seed(3)) * 7
    cos = F.cosine_similarity(f[:, None, :], expect_w[None, :, :], dim=-1)
    assert torch.allclose(head(f), (1 / 0.07) * cos, atol=1e-4)

    with torch.no_grad():
        head.logit_scale.fill_(math.log(2.0))
        head.fc.weight.mul_(3.0)  # trained weights are used as they are, not re-normalised
    assert torch.allclose(head(f), 2.0 * 3.0 * cos, atol=1e-5)


def test_cosine_control_uses_seeded_random_unit_vectors():
    a = CosineHead(E, C, None, generator=torch.Generator().manual_seed(7))
    b = CosineHead(E, C, None, generator=torch.Generator().manual_seed(7))
    c = CosineHead(E, C, None, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.fc.weight, b.fc.weight)
    assert not torch.allclose(a.fc.weight, c.fc.weight)
    assert torch.allclose(a.fc.weight.norm(dim=1), torch.ones(C))


@pytest.mark.parametrize("shape", [(C + 1, E), (C, E + 2)])
def test_head_rejects_init_of_wrong_shape(shape):
    with pytest.raises(ConfigError, match=r"\[4, 6\]"):
        CosineHead(E, C, torch.randn(*shape))


def _backward_reaches(model, x, backbone_weight):
    model.zero_grad()
    model(x).logsumexp(dim=1).sum().backward()
    for p in (model.head.fc.weight, model.head.logit_scale, backbone_weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("make,name,in_features,first", [
    (SmallCNN, "fc", 12, "conv"),
    (VGGLike, "classifier.6", 20, "features.0"),
    (TimmLike, "heads.head", 16, "body.1"),
])
def test_make_text_guided_replaces_the_classifier(make, name, in_features, first):
    torch.manual_seed(0)
    backbone = make()
    _, old = find_final_linear(backbone)
    emb = embeddings()
    model = make_text_guided(backbone, emb)
    assert isinstance(model, TextGuidedClassifier) and model.backbone is backbone
    assert model.classes == emb.classes
    projection = model.backbone.get_submodule(name)
    assert projection is not old
    assert isinstance(projection, nn.Linear) and projection.bias is not None
    assert (projection.in_features, projection.out_features) == (in_features, E)
    assert classifier_layer_name(model) == "head.fc"
    x = torch.randn(3, 1, 8, 8)
    assert model(x).shape == (3, C)
    _backward_reaches(model, x, model.backbone.get_submodule(first).weight)


def test_layer_argument_picks_a_nested_linear():
    # Without get_classifier() or layer=, the last registered Linear wins, even if unused.
    assert find_final_linear(ViTLike())[0] == "aux"
    model = make_text_guided(ViTLike(), embeddings(), layer="heads.head")
    assert (model.backbone.heads.head.in_features, model.backbone.heads.head.out_features) == (16, E)
    assert model.backbone.aux.out_features == 3
    x = torch.randn(2, 1, 8, 8)
    assert model(x).shape == (2, C)
    _backward_reaches(model, x, model.backbone.body[1].weight)


def test_freeze_keeps_class_vectors_fixed_but_trains_the_rest():
    model = make_text_guided(SmallCNN(), embeddings(), freeze_head=True)
    assert model.head.fc.weight.requires_grad is False
    assert model.head.logit_scale.requires_grad is True
    before = model.head.fc.weight.clone()
    conv_before = model.backbone.conv.weight.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = F.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert model.head.fc.weight.grad is None
    opt.step()
    assert torch.equal(model.head.fc.weight, before)
    assert not torch.equal(model.backbone.conv.weight, conv_before)


def test_tensor_embeddings_and_cosine_head_share_one_structure():
    vectors = embeddings().vectors
    text = make_text_guided(SmallCNN(), vectors)
    assert text.classes is None
    assert torch.allclose(text.head.fc.weight, F.normalize(vectors, dim=1), atol=1e-6)
    # The checkpoint loader rebuilds either head kind as a cosine head of the right width.
    control = make_text_guided(SmallCNN(), None, head="cosine", embed_dim=E, num_classes=C,
                               generator=torch.Generator().manual_seed(0))
    assert {k: v.shape for k, v in text.state_dict().items()} == {
        k: v.shape for k, v in control.state_dict().items()}
    control.load_state_dict(text.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(control(x), text(x))
    # Without num_classes the control keeps the backbone's class count.
    assert make_text_guided(SmallCNN(7), None, head="cosine", embed_dim=5).head.fc.weight.shape \
        == (7, 5)


def test_classifier_layer_name_for_plain_and_wrapped_models():
    assert classifier_layer_name(VGGLike()) == "classifier.6"
    assert classifier_layer_name(TimmLike()) == "heads.head"
    wrapped = nn.Sequential(make_text_guided(SmallCNN(), embeddings()))
    assert classifier_layer_name(wrapped) == "0.head.fc"
    name, module = find_final_linear(VGGLike(), "classifier.3")
    assert name == "classifier.3" and module.out_features == 20


def test_make_text_guided_errors():
    with pytest.raises(ConfigError, match="no nn.Linear"):
        make_text_guided(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), embeddings())
    with pytest.raises(UnknownNameError, match="classifier.0, classifier.3, classifier.6"):
        make_text_guided(VGGLike(), embeddings(), layer="classifier.9")
    with pytest.raises(ConfigError, match="Conv2d, not an nn.Linear"):
        make_text_guided(VGGLike(), embeddings(), layer="features.0")
    with pytest.raises(ConfigError, match="num_classes=10"):
        make_text_guided(SmallCNN(), embeddings(), num_classes=10)
    with pytest.raises(ConfigError, match="embed_dim=384"):
        make_text_guided(SmallCNN(), embeddings(), embed_dim=384)
    with pytest.raises(UnknownNameError, match="cosine, text"):
        make_text_guided(SmallCNN(), embeddings(), head="linear")
    with pytest.raises(ConfigError, match="needs class embeddings"):
        make_text_guided(SmallCNN(), None)
    with pytest.raises(ConfigError, match="embed_dim"):
        make_text_guided(SmallCNN(), None, head="cosine")
    with pytest.raises(ConfigError, match="2-D"):
        make_text_guided(SmallCNN(), torch.randn(C, E, 1))
    with pytest.raises(ConfigError, match="already has a cosine head"):
        make_text_guided(make_text_guided(SmallCNN(), embeddings()), embeddings())


ARCHS = ["mlp", "lenet", "resnet20", "resnet18", "vgg11_bn", "mobilenetv2", "vit_tiny"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_builtin_backbone_becomes_text_guided(arch):
    models = pytest.importorskip("flipsafe.models")
    torch.manual_seed(0)
    backbone = models.build(arch, num_classes=10, in_channels=1, image_size=8)
    name, old = find_final_linear(backbone)
    emb = embeddings(c=10, e=E)
    model = make_text_guided(backbone, emb)
    projection = model.backbone.get_submodule(name)
    assert (projection.in_features, projection.out_features) == (old.in_features, E)
    assert classifier_layer_name(model) == "head.fc"
    model.train()
    x = torch.randn(2, 1, 8, 8)
    assert model(x).shape == (2, 10)
    first = next(p for n, p in model.backbone.named_parameters() if p.dim() > 1)
    _backward_reaches(model, x, first)
