"""Small-input convolutional backbones and an MLP built from plain torch modules."""

from __future__ import annotations

from torch import nn

# Every activation is its own non-inplace module instance: fault-injection hooks
# read each module's output, and a shared or inplace module would hide or
# overwrite the value a hook saw.


def conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
    return [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]


class MLP(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, image_size: int, hidden=(256, 128)):
        super().__init__()
        layers = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=False)]
            width = h
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class LeNet(nn.Module):
    """LeNet-5 layout with padded 5x5 convs so 8x8 inputs keep a 2x2 map."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        side = image_size // 4
        self.hidden = nn.Sequential(
            nn.Linear(16 * side * side, 120),
            nn.ReLU(inplace=False),
            nn.Linear(120, 84),
            nn.ReLU(inplace=False),
        )
        self.fc = nn.Linear(84, num_classes)

    def forward(self, x):
        return self.fc(self.hidden(self.features(x)))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        conv1, bn1 = conv_bn(c_in, c_out, 3, stride)
        conv2, bn2 = conv_bn(c_out, c_out, 3, 1)
        self.conv1, self.bn1, self.relu1 = conv1, bn1, nn.ReLU(inplace=False)
        self.conv2, self.bn2 = conv2, bn2
        # A 1x1 projection (not zero-padding) keeps the shortcut inside a module.
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(*conv_bn(c_in, c_out, 1, stride))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, no max-pool, stages of basic blocks."""

    def __init__(self, num_classes: int, in_channels: int, widths, blocks_per_stage: int):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(in_channels, widths[0]), nn.ReLU(inplace=False))
        stages, c_in = [], widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(c_in, width, stride))
                c_in = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(x))))


VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG(nn.Module):
    """VGG-11 with BatchNorm; keeps only the max-pools the input size allows."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        pools_left = image_size.bit_length() - 1  # halvings before the map is 1x1
        layers, c_in = [], in_channels
        for item in VGG11:
            if item == "M":
                if pools_left > 0:
                    layers.append(nn.MaxPool2d(2))
                    pools_left -= 1
                continue
            layers += [nn.Conv2d(c_in, item, 3, padding=1), nn.BatchNorm2d(item),
                       nn.ReLU(inplace=False)]
            c_in = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers = []
        if expand != 1:
            layers += [*conv_bn(c_in, hidden, 1), nn.ReLU6(inplace=False)]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=False)]
        layers += conv_bn(hidden, c_out, 1)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        out = self.body(x)
        return x + out if self.residual else out


# (expansion, channels, repeats, stride); the ImageNet strides of the stem and
# of the 24-channel stage are 1 here so 8x8 inputs still reach a 1x1 map.
MOBILENETV2 = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
               (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, last_channels: int = 1280):
        super().__init__()
        layers = [*conv_bn(in_channels, 32), nn.ReLU6(inplace=False)]
        c_in = 32
        for expand, c_out, repeats, stride in MOBILENETV2:
            for i in range(repeats):
                layers.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expand))
                c_in = c_out
        layers += [*conv_bn(c_in, last_channels, 1), nn.ReLU6(inplace=False)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(last_channels, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)))


def init_weights(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def resnet20(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return init_weights(ResNet(num_classes, in_channels, (16, 32, 64), 3))


def resnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return init_weights(ResNet(num_classes, in_channels, (64, 128, 256, 512), 2))


def vgg11_bn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return init_weights(VGG(num_classes, in_channels, image_size))


def mobilenetv2(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return init_weights(MobileNetV2(num_classes, in_channels))


def mlp(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return MLP(num_classes, in_channels, image_size)


def lenet(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return LeNet(num_classes, in_channels, image_size)

