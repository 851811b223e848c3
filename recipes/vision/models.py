"""Image classifiers of the vision recipe, built by name with :func:`build_model`.

Every factory in :data:`MODELS` takes ``(num_classes, in_channels, image_size, **options)`` so that the data
module decides the input shape (Fashion-MNIST: 1×28×28, CIFAR-10: 3×32×32):

* ``small_cnn``: two conv-BN-ReLU-pool blocks and a small MLP head (:class:`SmallCNN`), CPU-friendly;
* ``mlp``: one hidden layer, no BatchNorm (:class:`MLP`);
* ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``, ``resnet110``: the CIFAR ResNets of He et al. (2016)
  (:class:`CifarResNet`, depth ``6n + 2``);
* ``torchvision:<name>`` (e.g. ``torchvision:resnet18``): any ``torchvision.models`` classifier, when
  torchvision imports (it is not a dependency). These expect 3-channel inputs.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "MODELS", "TORCHVISION_PREFIX", "CifarResNet", "SmallCNN", "build_model", "check_model_name"]

#: Model names starting with this prefix are looked up in ``torchvision.models``.
TORCHVISION_PREFIX = "torchvision:"


class SmallCNN(nn.Module):
    """conv(in->16, 3)-BN-ReLU-maxpool, conv(16->32, 3)-BN-ReLU-maxpool, linear(32·(s/4)² -> hidden)-ReLU,
    [dropout], linear(hidden -> classes), for ``s × s`` inputs (``s`` divisible by 4).

    About 55k parameters for 10 classes on 28×28 inputs (hidden=32). The BatchNorm layers give the model float
    buffers (running mean/var) besides its parameters, which the decentralized strategies must average too.

    The small hidden layer is there for stability: a single linear layer straight from the 1,568
    non-negative conv features overshoots badly in the first steps at lr=0.05 with momentum 0.9
    (loss 2.3 -> 14), and ends up ~10 points less accurate after 3 epochs on mnist5k.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, hidden: int = 32, dropout: float = 0.0,
                 image_size: int = 28) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if image_size < 4 or image_size % 4:
            raise ValueError(f"small_cnn needs an image size divisible by 4, got {image_size}")
        side = image_size // 4
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # s -> s/2
            nn.Conv2d(16, 32, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # s/2 -> s/4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Flatten, linear(in_features -> hidden), ReLU, linear(hidden -> classes). No BatchNorm, no buffers."""

    def __init__(self, num_classes: int = 10, in_features: int = 28 * 28, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`` with 3×3 convolutions.

    When the block halves the resolution and doubles the channels, the shortcut is the paper's option A:
    subsample by 2 and zero-pad the new channels (no parameters), as in the CIFAR experiments of He et al.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images (He et al., "Deep Residual Learning for Image Recognition", 2016, section 4.2).

    conv3×3(in -> 16)-BN-ReLU, then three stages of ``n`` basic blocks with 16, 32 and 64 channels (the second
    and third start with stride 2), global average pooling and a linear classifier: ``6n + 2`` weighted layers.
    ResNet-20 (n = 3) has 0.27 M parameters and reaches about 91-92 % on CIFAR-10 with the usual recipe.
    Global pooling makes it independent of the input size (28×28 and 32×32 both work).
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        self.conv = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(_BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(out.mean(dim=(2, 3)))


def _small_cnn(num_classes: int, in_channels: int, image_size: int, **options: Any) -> nn.Module:
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **options)


def _mlp(num_classes: int, in_channels: int, image_size: int, **options: Any) -> nn.Module:
    return MLP(num_classes=num_classes, in_features=in_channels * image_size * image_size, **options)


def _resnet(blocks_per_stage: int) -> Callable[..., nn.Module]:
    def factory(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return CifarResNet(blocks_per_stage, num_classes=num_classes, in_channels=in_channels)

    return factory


#: Model name -> factory ``(num_classes, in_channels, image_size, **options) -> nn.Module``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": _small_cnn,
    "mlp": _mlp,
    **{f"resnet{6 * n + 2}": _resnet(n) for n in (3, 5, 7, 9, 18)},
}

#: Options each built-in model accepts (keyword arguments of its class besides the data-given shape).
_OPTIONS: dict[str, tuple[str, ...]] = {"small_cnn": ("hidden", "dropout"), "mlp": ("hidden",)}


def _torchvision_models() -> Any:
    try:
        return importlib.import_module("torchvision.models")
    except Exception as error:  # torchvision missing, or installed against another torch build
        raise ValueError(f"model names starting with {TORCHVISION_PREFIX!r} need torchvision, which does not "
                         f"import here ({type(error).__name__}: {error}); use one of: {', '.join(MODELS)}") from error


def check_model_name(name: str) -> None:
    """Raise :class:`ValueError` naming the valid choices unless ``name`` is a known model."""
    if name.startswith(TORCHVISION_PREFIX):
        arch = name[len(TORCHVISION_PREFIX):]
        available = _torchvision_models().list_models()
        if arch not in available:
            raise ValueError(f"unknown torchvision model {arch!r}; torchvision has: {', '.join(available)}")
    elif name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(map(repr, MODELS))}, or "
                         f"'{TORCHVISION_PREFIX}<name>' when torchvision is installed")


def build_model(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                **options: Any) -> nn.Module:
    """Instantiate model ``name`` (see :data:`MODELS`) for ``in_channels × image_size²`` inputs.

    ``options`` go to the model's constructor (``small_cnn``: ``hidden``, ``dropout``; ``mlp``: ``hidden``;
    ``torchvision:<name>``: that model's keyword arguments). Unknown names or options raise :class:`ValueError`.
    """
    check_model_name(name)
    if name.startswith(TORCHVISION_PREFIX):
        if in_channels != 3:
            raise ValueError(f"{name} expects 3-channel images; this data has {in_channels} channel(s)")
        return _torchvision_models().get_model(name[len(TORCHVISION_PREFIX):], num_classes=num_classes, **options)
    allowed = _OPTIONS.get(name, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"model {name!r} has no option(s) {', '.join(unknown)}; valid options: "
                         f"{', '.join(allowed) if allowed else 'none'}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size, **options)
