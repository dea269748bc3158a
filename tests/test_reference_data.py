"""Tests of the reference experiments' data module (reference/data.py).

Fake IDX files are written into ``tmp_path``; the test on the real Fashion-MNIST files is skipped
when the Debian package is not installed. Nothing here touches the network.
"""

from __future__ import annotations

import gzip
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from reference.data import (
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    DatasetNotFoundError,
    TensorBatches,
    find_fashion_mnist,
    load_digits_datasets,
    load_fashion_mnist,
    read_idx,
    subset,
)


def idx_bytes(t: torch.Tensor) -> bytes:
    """Encode a tensor in the IDX format (big-endian), the inverse of read_idx."""
    codes = {torch.uint8: 0x08, torch.int32: 0x0C, torch.float32: 0x0D}
    header = bytes([0, 0, codes[t.dtype], t.dim()])
    header += b"".join(int(s).to_bytes(4, "big") for s in t.shape)
    data = t.contiguous().view(torch.uint8).view(-1, t.element_size()).flip(1)
    return header + data.numpy().tobytes()


def write_fake_fashion_mnist(
    directory: Path, n_train: int = 12, n_test: int = 5, gz: bool = True, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Write the four IDX files with random 28x28 images; return the tensors written."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "train_images": torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
        "train_labels": torch.randint(0, 10, (n_train,), generator=g, dtype=torch.uint8),
        "test_images": torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8),
        "test_labels": torch.randint(0, 10, (n_test,), generator=g, dtype=torch.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key, stem in FASHION_MNIST_FILES.items():
        raw = idx_bytes(tensors[key])
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)
    return tensors


# --- read_idx ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4),
        torch.tensor([1, -2, 70000], dtype=torch.int32),
        torch.tensor([[0.5, -1.25]], dtype=torch.float32),
    ],
)
def test_read_idx_round_trip(tmp_path: Path, tensor: torch.Tensor, gz: bool) -> None:
    raw = idx_bytes(tensor)
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    out = read_idx(path)
    assert out.dtype == tensor.dtype
    assert torch.equal(out, tensor)


def test_read_idx_rejects_non_idx(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)


def test_read_idx_rejects_truncated(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(idx_bytes(torch.zeros(4, 2, dtype=torch.uint8))[:-3])
    with pytest.raises(ValueError, match=r"truncated.*shape \[4, 2\]"):
        read_idx(path)


# --- find_fashion_mnist -----------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_find_explicit_directory(tmp_path: Path, gz: bool) -> None:
    write_fake_fashion_mnist(tmp_path / "fm", gz=gz)
    source = find_fashion_mnist(tmp_path / "fm", download=False)
    assert source.kind == "directory"
    assert source.location == tmp_path / "fm"
    assert source.files["test_labels"].name == "t10k-labels-idx1-ubyte" + (".gz" if gz else "")


def test_find_explicit_directory_torchvision_layout(tmp_path: Path) -> None:
    write_fake_fashion_mnist(tmp_path / "root" / "FashionMNIST" / "raw", gz=False)
    source = find_fashion_mnist(tmp_path / "root", download=False)
    assert source.kind == "directory"
    assert source.location == tmp_path / "root" / "FashionMNIST" / "raw"


def test_explicit_directory_missing_does_not_fall_back(tmp_path: Path) -> None:
    # Even when another copy exists, a wrong --data-dir must be reported, not silently replaced.
    write_fake_fashion_mnist(tmp_path / "debian")
    (tmp_path / "typo").mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        find_fashion_mnist(tmp_path / "typo", debian_dir=tmp_path / "debian", download=False)
    assert str(tmp_path / "typo") in str(info.value)


def test_explicit_directory_incomplete(tmp_path: Path) -> None:
    write_fake_fashion_mnist(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="not found in --data-dir"):
        find_fashion_mnist(tmp_path / "fm", download=False)


def test_find_debian_directory(tmp_path: Path) -> None:
    write_fake_fashion_mnist(tmp_path / "debian")
    source = find_fashion_mnist(
        debian_dir=tmp_path / "debian", download_root=tmp_path / "dl", download=False
    )
    assert source.kind == "debian"


def test_find_torchvision_cache_without_download(tmp_path: Path) -> None:
    write_fake_fashion_mnist(tmp_path / "dl" / "FashionMNIST" / "raw", gz=False)
    source = find_fashion_mnist(
        debian_dir=tmp_path / "nothing", download_root=tmp_path / "dl", download=False
    )
    assert source.kind == "torchvision"


def assert_names_all_three_options(message: str) -> None:
    assert "Three ways" in message
    assert "--data-dir" in message  # 1. explicit directory
    assert "apt-get install dataset-fashion-mnist" in message  # 2. Debian package
    assert str(DEBIAN_FASHION_MNIST_DIR) in message
    assert "torchvision.datasets.FashionMNIST" in message and "download=True" in message  # 3.
    for stem in FASHION_MNIST_FILES.values():
        assert stem in message


def test_nothing_found_names_all_three_options(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        find_fashion_mnist(
            debian_dir=tmp_path / "no-debian", download_root=tmp_path / "dl", download=False
        )
    assert_names_all_three_options(str(info.value))
    assert isinstance(info.value, FileNotFoundError)


def test_failed_download_names_all_three_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class OfflineFashionMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    fake_datasets = types.SimpleNamespace(FashionMNIST=OfflineFashionMNIST)
    fake_torchvision = types.ModuleType("torchvision")
    fake_torchvision.datasets = fake_datasets  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", fake_torchvision)
    with pytest.raises(DatasetNotFoundError) as info:
        find_fashion_mnist(debian_dir=tmp_path / "no-debian", download_root=tmp_path / "dl")
    message = str(info.value)
    assert_names_all_three_options(message)
    assert "RuntimeError" in message and "no network" in message


def test_download_uses_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []

    class FakeFashionMNIST:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append(train)
            raw = Path(root) / "FashionMNIST" / "raw"
            if not raw.exists():
                write_fake_fashion_mnist(raw, gz=False)

    fake_torchvision = types.ModuleType("torchvision")
    fake_torchvision.datasets = types.SimpleNamespace(FashionMNIST=FakeFashionMNIST)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", fake_torchvision)
    source = find_fashion_mnist(debian_dir=tmp_path / "no-debian", download_root=tmp_path / "dl")
    assert source.kind == "torchvision"
    assert calls == [True, False]


# --- loading ----------------------------------------------------------------------------------


def test_load_fake_fashion_mnist(tmp_path: Path) -> None:
    written = write_fake_fashion_mnist(tmp_path, n_train=12, n_test=5)
    train, test, source = load_fashion_mnist(tmp_path, download=False)
    assert source.kind == "directory"
    x, y = train.tensors
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.equal(y, written["train_labels"].long())
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-4
    assert test.tensors[0].shape == (5, 1, 28, 28)
    # The test split uses the training statistics: the same pixel maps to the same value.
    pixel = written["test_images"][0, 0, 0]
    where = (written["train_images"] == pixel).nonzero()
    if len(where):
        i, r, c = where[0].tolist()
        assert float(test.tensors[0][0, 0, 0, 0]) == pytest.approx(float(x[i, 0, r, c]))


def test_load_rejects_mismatched_counts(tmp_path: Path) -> None:
    write_fake_fashion_mnist(tmp_path)
    labels = idx_bytes(torch.zeros(3, dtype=torch.uint8))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    with pytest.raises(ValueError, match="train files disagree"):
        load_fashion_mnist(tmp_path, download=False)


@pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install it to run this)",
)
def test_real_fashion_mnist_from_debian() -> None:
    train, test, source = load_fashion_mnist()
    assert source.kind == "debian"
    assert train.tensors[0].shape == (60000, 1, 28, 28)
    assert test.tensors[0].shape == (10000, 1, 28, 28)
    # Fashion-MNIST is balanced: 6000 training and 1000 test images per class.
    assert torch.bincount(train.tensors[1]).tolist() == [6000] * 10
    assert torch.bincount(test.tensors[1]).tolist() == [1000] * 10
    assert abs(float(train.tensors[0].mean())) < 1e-3


def test_load_digits_datasets() -> None:
    pytest.importorskip("sklearn")
    train, test = load_digits_datasets(test_fraction=0.25, seed=0)
    assert train.tensors[0].shape[1:] == (1, 8, 8)
    assert len(train) + len(test) == 1797
    assert len(test) == 450
    assert set(test.tensors[1].tolist()) == set(range(10))
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_datasets(test_fraction=1.5)


# --- batching ---------------------------------------------------------------------------------


def test_tensor_batches_cover_every_item_once() -> None:
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10))
    batches = list(TensorBatches(data, batch_size=4, seed=3))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(10))
    assert torch.equal(torch.cat([x.flatten() for x, _ in batches]).long(), seen)
    again = torch.cat([y for _, y in TensorBatches(data, batch_size=4, seed=3)])
    assert torch.equal(seen, again)  # same seed, same order
    assert len(TensorBatches(data, batch_size=4, drop_last=True)) == 2
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatches(data, batch_size=0)


def test_tensor_batches_augmentation_keeps_shape() -> None:
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))
    for x, _ in TensorBatches(data, batch_size=8, flip=True, shift=2):
        assert x.shape == (8, 1, 28, 28)


def test_subset_is_deterministic() -> None:
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.arange(20.0), torch.arange(20))
    a, b = subset(data, 5, seed=1), subset(data, 5, seed=1)
    assert torch.equal(a.tensors[1], b.tensors[1]) and len(a) == 5
    assert torch.equal(a.tensors[0].long(), a.tensors[1])
    assert subset(data, None) is data
    with pytest.raises(ValueError, match="subset size"):
        subset(data, 21)


# --- the training script on the tiny digits set ------------------------------------------------


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """The script sets torch's thread count; put it back for the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", ["dense", "spartan", "gmp"])
@pytest.mark.usefixtures("restore_threads")
def test_training_script_on_digits(tmp_path: Path, method: str) -> None:
    """End to end on sklearn digits: trains, finalises, reports exact sparsity, writes the JSON."""
    pytest.importorskip("sklearn")
    import json

    from reference.fashion_mnist import main

    out = tmp_path / "run.json"
    argv = ["--dataset", "digits", "--method", method, "--epochs", "2", "--batch-size", "64"]
    argv += ["--widths", "8,16,32", "--sparsity", "0.9", "--threads", "1"]
    argv += ["--no-progress", "--out", str(out)]
    result = main(argv)
    saved = json.loads(out.read_text())
    assert saved["test_accuracy"] == result["test_accuracy"] > 0.3  # well above chance (0.1)
    steps = saved["steps"]
    if method == "dense":
        assert saved["achieved_sparsity"] == 0.0 and steps["mask_change"] == []
        return
    assert len(steps["mask_change"]) == saved["total_steps"] == 2 * (1347 // 64)
    assert all(0.0 <= c <= 1.0 for c in steps["mask_change"])
    assert steps["mask_change"][-1] == 0.0  # mask frozen in the fine-tuning phase
    assert steps["density"][0] > steps["density"][-1]
    # sparsity counted over all parameters (the paper's convention), exact after finalize
    assert saved["achieved_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert "all parameters" in saved["sparsity_report"]


def test_training_script_rejects_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from reference.fashion_mnist import main

    with pytest.raises(SystemExit):
        main(["--sparsity", "1.5"])
    assert "sparsity must be in [0, 1), got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--block", "4by4"])
    assert "--block must look like 4x4" in capsys.readouterr().err


def test_compare_plans_and_resumes(tmp_path: Path) -> None:
    from reference.compare import VARIANTS, plan_runs

    runs = plan_runs()
    # dense and 2:4 (fixed sparsities) once per seed, the others at 3 sparsities x 3 seeds
    assert len(runs) == sum(3 if v.sparsity is not None else 9 for v in VARIANTS)
    assert len({r.name for r in runs}) == len(runs)
    subset_runs = plan_runs(["spartan", "gmp"], [0.95], [0])
    assert [r.name for r in subset_runs] == ["spartan-s95-seed0", "gmp-s95-seed0"]
    cmd = subset_runs[0].command(tmp_path / "x.json", {"epochs": 1, "train_subset": None})
    assert cmd[cmd.index("--sparsity") + 1] == "0.95" and "--train-subset" not in cmd
    with pytest.raises(ValueError, match="unknown method 'sparta'"):
        plan_runs(["sparta"])


def test_compare_redoes_runs_of_other_settings(tmp_path: Path) -> None:
    import json

    from reference.compare import SETTINGS, VARIANTS, is_done

    names = [v.name for v in VARIANTS]
    assert names == ["dense", "gmp", "topkast", "rigl", "spartan", "spartan-uniform",
                     "spartan-erk", "spartan-4x4", "spartan-2:4"]
    assert SETTINGS["train_subset"] is None  # all 60000 training images
    path = tmp_path / "rigl-s95-seed0.json"
    assert not is_done(path, SETTINGS)
    config = {"train_subset": 30000, "epochs": 3, "widths": [16, 32, 64]}
    path.write_text(json.dumps({"config": config}))
    assert not is_done(path, SETTINGS)  # the earlier 30000-image comparison: redone
    path.write_text(json.dumps({"config": {**config, "train_subset": None}}))
    assert is_done(path, SETTINGS)


# --- N:M (2:4) in the reference scripts (no training) ------------------------------------------


def test_policy_choices_build_fresh_policies() -> None:
    import torchspartan as ts
    from reference.common import POLICIES, build_policy, nm_sparsity_error

    assert {"global", "uniform", "erk", "nm24", "nm14"} <= set(POLICIES)
    nm24, nm14 = build_policy("nm24"), build_policy("nm14")
    assert isinstance(nm24, ts.NM) and (nm24.n, nm24.m) == (2, 4)
    assert isinstance(nm14, ts.NM) and (nm14.n, nm14.m) == (1, 4)
    assert build_policy("nm24") is not nm24  # a factory: a new policy object per call
    assert isinstance(build_policy("erk"), ts.ERK)
    with pytest.raises(ValueError, match="policy must be one of"):
        build_policy("nm")
    assert nm_sparsity_error("nm24", 0.5, "masked") is None
    assert nm_sparsity_error("nm14", 0.75, "masked") is None
    assert nm_sparsity_error("global", 0.95, "model") is None
    message = nm_sparsity_error("nm24", 0.95, "model")
    assert message is not None and "--sparsity 0.5 --sparsity-of masked" in message
    assert "--sparsity 0.5 --sparsity-of masked" in (nm_sparsity_error("nm24", 0.5, "model") or "")


def test_training_script_refuses_nm_mismatch(capsys: pytest.CaptureFixture[str]) -> None:
    """A sparsity that is not the pattern's, or a tensor without groups of 4 (the stem conv's
    single input channel), ends as a usage error that names the fix, before any training."""
    pytest.importorskip("sklearn")
    from reference.fashion_mnist import main

    with pytest.raises(SystemExit):
        main(["--dataset", "digits", "--policy", "nm24", "--sparsity", "0.9"])
    err = capsys.readouterr().err
    assert "keeps 2 of every 4" in err and "--sparsity 0.5 --sparsity-of masked" in err
    argv = ["--dataset", "digits", "--policy", "nm24", "--sparsity", "0.5"]
    argv += ["--sparsity-of", "masked", "--widths", "8,16,32", "--no-progress"]
    with pytest.raises(SystemExit):
        main(argv)  # the library's refusal (stem.0.weight: dim 1 is 1), passed on
    err = capsys.readouterr().err
    assert "stem.0.weight" in err and "multiple of 4" in err and "--exclude" in err


def test_nm_pattern_exact_reads_groups_along_dim_1() -> None:
    from torch import nn

    from reference.fashion_mnist import nm_pattern_exact

    model = nn.Sequential(nn.Conv2d(8, 3, 2, bias=False), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        conv = torch.zeros(3, 8, 2, 2)
        conv[:, [0, 3, 5, 6]] = 1.0  # 2 nonzeros in each group of 4 input channels
        model[0].weight.copy_(conv)
        model[1].weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0]]))
    names = ["0.weight", "1.weight"]
    assert nm_pattern_exact(model, names, 2, 4)
    assert not nm_pattern_exact(model, names, 1, 4)
    with torch.no_grad():
        model[0].weight[1, 1, 0, 1] = 0.5  # a third nonzero in one group of channels 0-3
    assert not nm_pattern_exact(model, names, 2, 4)
    assert nm_pattern_exact(model, ["1.weight"], 2, 4)
    with pytest.raises(ValueError, match="no groups of 3"):
        nm_pattern_exact(model, ["1.weight"], 1, 3)


def test_compare_runs_2_4_at_its_own_sparsity(tmp_path: Path) -> None:
    from reference.compare import VARIANTS, plan_runs

    (variant,) = [v for v in VARIANTS if v.name == "spartan-2:4"]
    runs = plan_runs(["spartan-2:4", "spartan"], [0.9, 0.95], [0, 1, 2])
    assert [r.name for r in runs if r.variant is variant] == [
        f"spartan-2-4-s50-seed{seed}" for seed in (0, 1, 2)
    ]  # once per seed at 0.5, whatever the grid; no ':' in file names
    assert len(runs) == 3 * (1 + 2)
    cmd = runs[0].command(tmp_path / "x.json", {"epochs": 3})
    flags = " ".join(cmd)
    assert "--policy nm24" in flags and "--sparsity-of masked" in flags
    assert cmd[cmd.index("--sparsity") + 1] == "0.5"
    assert cmd[cmd.index("--exclude") + 1] == r"^stem\."


def _fake_run(name: str, sparsity: float, accuracy: float, **config: Any) -> dict[str, Any]:
    seed = int(name.rsplit("seed", 1)[1])
    base = {"sparsity": sparsity, "seed": seed, "sparsity_of": "model", "widths": [8, 16, 32]}
    base.update(blocks=1, epochs=1, batch_size=64, momentum=0.9, lr=0.1, warmup=0.03)
    base.update(weight_decay=5e-4, **config)
    return {
        "name": name,
        "config": base,
        "test_accuracy": accuracy,
        "achieved_sparsity": sparsity if base["sparsity_of"] == "model" else 0.49,
        "achieved_sparsity_masked": 0.5 if base["sparsity_of"] == "masked" else None,
        "params": 1000,
        "train_images": 100,
        "test_images": 50,
        "time_s": {"total": 10.0},
        "environment": {"cpu_count": 2, "torch": "x", "threads": 1},
        "steps": {"mask_change": []},
        **({"nm_pattern": [2, 4], "nm_pattern_exact": True} if sparsity == 0.5 else {}),
    }


def test_compare_table_shows_2_4_at_its_sparsity(tmp_path: Path) -> None:
    from reference.compare import aggregate, write_markdown

    results = [
        _fake_run("dense-s00-seed0", 0.0, 0.88),
        _fake_run("spartan-s90-seed0", 0.9, 0.86),
        _fake_run("spartan-2-4-s50-seed0", 0.5, 0.87, sparsity_of="masked"),
        _fake_run("spartan-2-4-s50-seed1", 0.5, 0.85, sparsity_of="masked"),
    ]
    rows = aggregate(results)
    nm = [r for r in rows if r["variant"] == "spartan-2:4"]
    assert len(nm) == 1 and nm[0]["seeds"] == [0, 1] and nm[0]["nm_pattern_exact_all"]
    assert nm[0]["achieved_sparsity_masked_mean"] == 0.5
    write_markdown(rows, results, {}, tmp_path / "t.md")
    text = (tmp_path / "t.md").read_text()
    assert "| method | 50% of masked weights | 90% sparse |" in text
    assert (
        "| Spartan (2:4, N:M; stem unmasked) | 86.00 +- 1.41 [49.0% of all; 50.0% of masked] "
        "(n=2) | - |" in text
    )
    assert "| Spartan (global) | - | 86.00 +- 0.00 [90.0%] (n=1) |" in text
    assert "| dense (0% sparse) | 88.00 +- 0.00 (n=1) | 88.00 +- 0.00 (n=1) |" in text
    assert "N:M pattern" in text and "held in all 2 runs" in text
