"""Export of finalized sparse models: sparse layers, compact checkpoint, FLOP/size report.

Sparse models are made by hand (magnitude zeros: 95% unstructured, 90% in 16x16 blocks), plus
one end-to-end test through ts.sparsify + ts.DualAveraging + ts.finalize. Runs on one intra-op
thread (the machine is shared; timings in the auto test only need to be self-consistent).
"""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import torchspartan as ts
from torchspartan.cost_report import ExportReport, export_report
from torchspartan.export import to_sparse
from torchspartan.sparse_checkpoint import CheckpointInfo, load_sparse, save_sparse
from torchspartan.sparse_layers import SparseConv2d, SparseLinear

torch.set_flush_denormal(True)
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- sparse models made by hand ------------------------------------------------------------------


@torch.no_grad()
def zero_unstructured(w: torch.Tensor, sparsity: float) -> None:
    """Zero the smallest-magnitude ``sparsity`` fraction of ``w``."""
    k = int(round(w.numel() * sparsity))
    thr = w.abs().flatten().kthvalue(k).values
    w.mul_(w.abs() > thr)


@torch.no_grad()
def zero_blocks(w: torch.Tensor, sparsity: float, block: int = 16) -> None:
    """Zero the ``sparsity`` fraction of ``block x block`` blocks of the 2-D view with the smallest
    sum of magnitudes (a conv weight is viewed as ``(out, in * kh * kw)``)."""
    w2 = w.view(w.shape[0], -1)
    rows, cols = w2.shape
    score = w2.abs().reshape(rows // block, block, cols // block, block).sum((1, 3))
    k = int(round(score.numel() * sparsity))
    keep = score > score.flatten().kthvalue(k).values
    w2.mul_(keep.repeat_interleave(block, 0).repeat_interleave(block, 1))


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 256), nn.ReLU(),
                         nn.Linear(256, 10)).to(dtype)


def unstructured_mlp(seed: int = 0) -> nn.Sequential:
    model = mlp(seed)
    for i in (0, 2):
        zero_unstructured(model[i].weight, 0.95)
    return model


def block_mlp(seed: int = 0) -> nn.Sequential:
    model = mlp(seed)
    for i in (0, 2):
        zero_blocks(model[i].weight, 0.9)
    return model


def convnet(seed: int = 0, blocks: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 1), nn.ReLU(),                       # pointwise
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),  # strided 3x3
        nn.Conv2d(32, 32, 3, padding="same", dilation=2, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )
    for m in list(model)[2:]:  # the first conv stays dense; with blocks the 10-output head too
        if isinstance(m, nn.Conv2d) and blocks:
            zero_blocks(m.weight, 0.9)
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and not blocks:
            zero_unstructured(m.weight, 0.95)
    return model


INPUTS = {
    "mlp": [torch.randn(1, 64), torch.randn(64), torch.randn(7, 64), torch.randn(2, 3, 64)],
    "conv": [torch.randn(1, 3, 8, 8), torch.randn(3, 3, 8, 8)],
}


def _check_same_outputs(model: nn.Module, sparse_model: nn.Module, kind: str) -> None:
    with torch.no_grad():
        for x in INPUTS[kind]:
            ref, out = model(x), sparse_model(x)
            assert out.shape == ref.shape
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# -- outputs of every CPU layout -----------------------------------------------------------------


CASES: dict[str, tuple[Callable[[], nn.Module], str, str, int | None]] = {
    "csr-unstructured-mlp": (unstructured_mlp, "mlp", "csr", None),
    "csr-block-mlp": (block_mlp, "mlp", "csr", None),
    "bsr-detected-mlp": (block_mlp, "mlp", "bsr", None),
    "bsr-16-mlp": (block_mlp, "mlp", "bsr", 16),
    "bsr-8-mlp": (block_mlp, "mlp", "bsr", 8),
    "csr-conv": (lambda: convnet(), "conv", "csr", None),
    "bsr-conv": (lambda: convnet(blocks=True), "conv", "bsr", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_outputs_match_dense(case: str) -> None:
    build, kind, layout, blocksize = CASES[case]
    dense = build()
    model = build()
    summary = to_sparse(model, layout, blocksize=blocksize)  # type: ignore[arg-type]
    _check_same_outputs(dense, model, kind)
    sparse_rows = [r for r in summary.layers if r.layout != "dense"]
    assert len(sparse_rows) >= 2
    for r in summary.layers:
        module = model.get_submodule(r.name)
        if r.layout == "dense":
            assert type(module) in (nn.Linear, nn.Conv2d)
            assert "min_sparsity" in r.note  # only the dense first/last layers stay dense
        else:
            assert isinstance(module, (SparseLinear, SparseConv2d))
            assert module.layout == r.layout == layout
            if layout == "bsr":
                expected = (blocksize, blocksize) if blocksize else (16, 16)  # detected: 16
                assert r.blocksize == module.blocksize == expected
    assert "layers sparse" in str(summary)


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # nn.Conv2d's own warning
@pytest.mark.parametrize("kwargs", [
    {"kernel_size": 3, "padding": 1}, {"kernel_size": 1, "stride": 2},
    {"kernel_size": 3, "stride": 2, "padding": 2, "dilation": 2},
    {"kernel_size": (3, 5), "stride": (2, 1), "padding": (1, 2)},
    {"kernel_size": 4, "padding": "same"}, {"kernel_size": 3, "padding": "valid", "bias": False},
])
def test_sparse_conv2d_matches_conv2d(kwargs: dict) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, **kwargs)
    zero_unstructured(conv.weight, 0.8)
    sparse = SparseConv2d.from_dense(conv, "csr")
    inputs = [torch.randn(3, 8, 11, 9), torch.randn(8, 11, 9),  # batched, unbatched
              torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)]
    with torch.no_grad():
        for x in inputs:
            torch.testing.assert_close(sparse(x), conv(x), rtol=1e-5, atol=1e-5)
    back = sparse.to_dense_module()
    assert torch.equal(back.weight, conv.weight) and back.padding == conv.padding
    with pytest.raises(ValueError, match="groups=1"):
        SparseConv2d.from_dense(nn.Conv2d(8, 8, 3, groups=2), "csr")


def test_float64_and_round_trip_to_dense() -> None:
    model = unstructured_mlp().double()
    ref = [model(x.double()) for x in INPUTS["mlp"]]
    to_sparse(model, "csr")
    assert isinstance(model[0], SparseLinear) and model[0].weight.layout == torch.sparse_csr
    for x, r in zip(INPUTS["mlp"], ref, strict=True):
        torch.testing.assert_close(model(x.double()), r)
    summary = to_sparse(model, "dense")  # back to plain layers, same weights
    assert type(model[0]) is nn.Linear and set(summary.layouts.values()) == {"dense"}
    for x, r in zip(INPUTS["mlp"], ref, strict=True):
        torch.testing.assert_close(model(x.double()), r)


def test_shared_layer_replaced_everywhere_and_attention_out_proj_kept() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(32, 32)
    zero_unstructured(shared.weight, 0.95)
    attn = nn.MultiheadAttention(32, 4, batch_first=True)
    zero_unstructured(attn.out_proj.weight, 0.95)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = shared
            self.b = shared
            self.attn = attn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.b(self.a(x))
            return self.attn(x, x, x, need_weights=False)[0]

    net = Net().eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = net(x)
    summary = to_sparse(net, "csr")
    assert net.a is net.b and isinstance(net.a, SparseLinear)
    assert type(net.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert "MultiheadAttention" in {r.name: r.note for r in summary.layers}["attn.out_proj"]
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="2:4 semi-structured kernels need CUDA")
def test_semi_structured_matches_dense_on_cuda() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128)).cuda().half()
    with torch.no_grad():
        for i in (0, 2):
            w = model[i].weight
            groups = w.abs().reshape(128, 32, 4)
            keep = torch.zeros_like(groups, dtype=torch.bool)
            keep.scatter_(2, groups.topk(2, dim=2).indices, True)
            w.mul_(keep.reshape(128, 128))
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    with torch.no_grad():
        ref = model(x)
        to_sparse(model, "semi_structured")
        assert isinstance(model[0], SparseLinear) and model[0].layout == "semi_structured"
        torch.testing.assert_close(model(x), ref, rtol=1e-2, atol=1e-2)
    auto = to_sparse(model, "auto", example_inputs=x)
    for r in auto.layers:
        assert "semi_structured" in r.times and r.times[r.layout] == min(r.times.values())


# -- auto ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("build,kind", [(unstructured_mlp, "mlp"), (block_mlp, "mlp"),
                                        (lambda: convnet(), "conv")])
@pytest.mark.parametrize("batch", [1, 32])
def test_auto_never_picks_a_slower_layout(build: Callable[[], nn.Module], kind: str,
                                          batch: int) -> None:
    dense, model = build(), build()
    example = torch.randn(batch, *INPUTS[kind][0].shape[1:])
    summary = to_sparse(model, "auto", example_inputs=example, min_run_time=0.005)
    timed = [r for r in summary.layers if r.times]
    assert timed, "auto measured nothing"
    for r in timed:
        assert r.times[r.layout] == min(r.times.values()), r
        assert r.speedup is not None and r.speedup >= 1.0
        assert {"dense", "csr"} <= set(r.times)
        if build is block_mlp:
            assert "bsr" in r.times
        module = model.get_submodule(r.name)
        assert isinstance(module, (SparseLinear, SparseConv2d)) == (r.layout != "dense")
    _check_same_outputs(dense, model, kind)


# -- bad input -----------------------------------------------------------------------------------


def _named_mlp() -> nn.Sequential:
    """Layers with recognisable names: 'encoder' (95% unstructured), 'odd' (40 outputs)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("encoder", nn.Linear(64, 128))
    model.add_module("odd", nn.Linear(128, 40))
    zero_unstructured(model.encoder.weight, 0.95)
    zero_unstructured(model.odd.weight, 0.9)
    return model


def test_refuses_a_model_that_is_not_finalized() -> None:
    model = _named_mlp()
    ts.sparsify(model)
    for call in (lambda: to_sparse(model, "csr"), lambda: save_sparse(model, "unused.pt")):
        with pytest.raises(ValueError, match=r"'encoder'.*not finalized.*ts\.finalize"):
            call()
    assert not os.path.exists("unused.pt")


def test_refuses_other_parametrizations_on_exported_weights() -> None:
    model = _named_mlp()
    nn.utils.parametrizations.weight_norm(model.odd)
    with pytest.raises(ValueError, match=r"'odd'.*remove_parametrizations"):
        to_sparse(model, "csr")


@pytest.mark.parametrize("kwargs,exc,pattern", [
    ({"layout": "coo"}, ValueError, r"unknown layout 'coo'.*'csr'"),
    ({"layout": "auto"}, ValueError, r"example_inputs"),
    ({"layout": "csr", "blocksize": 16}, ValueError, r"blocksize=16.*only for layout='bsr'"),
    ({"layout": "bsr", "blocksize": 0}, ValueError, r"positive"),
    ({"layout": "bsr", "blocksize": (16, 16, 1)}, TypeError, r"pair"),
    ({"layout": "bsr", "blocksize": 16, "exclude": ["encoder"]}, ValueError,
     r"layer 'odd'.*blocksize \(16, 16\) does not divide.*\(40, 128\).*\[8, 4, 2\]"),
    ({"layout": "bsr", "blocksize": 8}, ValueError,
     r"layer 'encoder'.*not 8x8 block-sparse.*layout='csr'"),
    ({"layout": "bsr"}, ValueError,
     r"layer 'encoder'.*not block-sparse for any block size.*layout='csr'"),
    ({"layout": "csr", "min_sparsity": 1.5}, ValueError, r"min_sparsity"),
])
def test_bad_input_is_refused_with_the_layer_value_and_fix(kwargs: dict, exc: type,
                                                           pattern: str) -> None:
    model = _named_mlp()
    before = [type(m) for m in model]
    with pytest.raises(exc, match=pattern):
        to_sparse(model, **kwargs)
    assert [type(m) for m in model] == before  # nothing replaced before the error


def test_semi_structured_refuses_cpu_and_patterns_that_are_not_2to4() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(64, 64))
    with torch.no_grad():
        model.proj.weight.view(64, 16, 4)[:, :, 2:] = 0  # exactly 2:4
    with pytest.raises(ValueError, match=r"layer 'proj'.*needs a CUDA weight.*cpu.*'csr'"):
        to_sparse(model, "semi_structured")
    with torch.no_grad():
        model.proj.weight.view(64, 16, 4)[5, 3, :] = 1.0  # row 5, inputs 12..15: 4 nonzeros
    with pytest.raises(ValueError, match=r"layer 'proj'.*not 2:4 sparse: row 5, inputs "
                                         r"12\.\.15 hold 4 nonzeros.*layout='csr'"):
        to_sparse(model, "semi_structured", min_sparsity=0.4)


def test_an_error_in_a_later_layer_leaves_the_model_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("blocks", nn.Linear(64, 128))
    model.add_module("odd", nn.Linear(128, 40))
    zero_blocks(model.blocks.weight, 0.9)
    zero_unstructured(model.odd.weight, 0.9)
    with pytest.raises(ValueError, match=r"layer 'odd'.*does not divide"):
        to_sparse(model, "bsr", blocksize=16)
    assert type(model.blocks) is nn.Linear and type(model.odd) is nn.Linear


def test_half_precision_on_cpu_is_refused() -> None:
    model = _named_mlp().half()
    with pytest.raises(TypeError, match=r"layer 'encoder'.*torch\.float16.*model\.float\(\)"):
        to_sparse(model, "csr")
    summary = to_sparse(model, "auto", example_inputs=torch.randn(2, 64).half(),
                        min_run_time=0.002)  # auto keeps it dense and says why
    assert "float16" in summary.layers[0].note and summary.layers[0].layout == "dense"


def test_bare_layer_and_non_module_are_refused() -> None:
    with pytest.raises(ValueError, match=r"nn\.Sequential\(layer\)"):
        to_sparse(nn.Linear(4, 4), "csr")
    with pytest.raises(TypeError, match="nn.Module"):
        to_sparse("model", "csr")  # type: ignore[arg-type]


# -- the compact checkpoint ----------------------------------------------------------------------


@pytest.mark.parametrize("build,kind", [(unstructured_mlp, "mlp"), (block_mlp, "mlp"),
                                        (lambda: convnet(), "conv"),
                                        (lambda: convnet(blocks=True), "conv")])
def test_checkpoint_round_trips_and_is_smaller(build: Callable[[], nn.Module], kind: str,
                                               tmp_path: Path) -> None:
    model = build()
    dense_path, sparse_path = tmp_path / "dense.pt", tmp_path / "sparse.pt"
    torch.save(model.state_dict(), dense_path)
    info = save_sparse(model, sparse_path)
    assert isinstance(info, CheckpointInfo)
    assert info.file_bytes == sparse_path.stat().st_size
    dense_size = dense_path.stat().st_size
    assert abs(info.dense_bytes - dense_size) < 0.01 * dense_size  # zip names differ
    assert info.file_bytes < 0.45 * dense_size, str(info)
    if build is block_mlp:
        assert info.encodings["0.weight"] == "bsr"
    factory = (lambda: mlp(seed=1)) if kind == "mlp" else (lambda: convnet(seed=1))
    restored = load_sparse(factory, sparse_path)
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    _check_same_outputs(model, restored, kind)
    assert "smaller" in str(info)


def test_checkpoint_of_an_exported_model_and_tied_weights(tmp_path: Path) -> None:
    model = unstructured_mlp()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    to_sparse(model, "csr")
    info = save_sparse(model, tmp_path / "m.pt")
    restored = load_sparse(mlp(seed=3), tmp_path / "m.pt")
    for key, value in reference.items():
        assert torch.equal(restored.state_dict()[key], value), key
    with pytest.raises(TypeError, match=r"layer '0' is already exported.*to_sparse"):
        load_sparse(model, tmp_path / "m.pt")
    assert info.encodings["0.weight"] in ("csr", "bitmask")

    tied = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    tied[1].weight = tied[0].weight
    zero_unstructured(tied[0].weight, 0.9)
    info = save_sparse(tied, tmp_path / "t.pt")
    assert info.encodings["1.weight"] == "alias"
    fresh = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    load_sparse(fresh, tmp_path / "t.pt")
    assert torch.equal(fresh[1].weight, tied[0].weight)


def test_load_refuses_other_files(tmp_path: Path) -> None:
    model = mlp()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a torchspartan sparse checkpoint"):
        load_sparse(model, tmp_path / "plain.pt")
    with pytest.raises(TypeError, match="nn.Module"):
        load_sparse(lambda: "not a model", tmp_path / "plain.pt")  # type: ignore[arg-type]


# -- the report ----------------------------------------------------------------------------------


def test_report_counts_flops_and_bytes() -> None:
    model = unstructured_mlp()
    x = torch.randn(5, 64)
    report = export_report(model, x)
    assert isinstance(report, ExportReport)
    by_name = {r.name: r for r in report.rows}
    assert list(by_name) == ["0.weight", "2.weight", "4.weight"]
    r0 = by_name["0.weight"]
    assert r0.positions == 5 and r0.numel == 128 * 64
    assert r0.dense_flops == 2 * 5 * 128 * 64
    assert r0.sparse_flops == 2 * 5 * int(torch.count_nonzero(model[0].weight))
    assert r0.dense_bytes == (128 * 64 + 128) * 4
    assert r0.memory_bytes == r0.dense_bytes and r0.compact_bytes < r0.dense_bytes / 3
    assert report.flop_reduction > 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.rows = ()  # type: ignore[misc]

    to_sparse(model, "csr")
    after = export_report(model, x)
    assert [r.layout for r in after.rows] == ["csr", "csr", "dense"]
    assert after.dense_flops == report.dense_flops and after.sparse_flops == report.sparse_flops
    assert after.memory_bytes < report.memory_bytes / 2
    text = str(after)
    assert "0.weight" in text and "total" in text and "fewer" in text


def test_report_conv_and_attention_positions() -> None:
    conv = convnet()
    report = export_report(conv, torch.randn(2, 3, 8, 8))
    rows = {r.name: r for r in report.rows}
    assert rows["0.weight"].positions == 2 * 8 * 8
    assert rows["4.weight"].positions == 2 * 4 * 4  # stride 2
    assert rows["9.weight"].positions == 2

    attn = nn.MultiheadAttention(16, 2, batch_first=True)
    q, kv = torch.randn(3, 4, 16), torch.randn(3, 6, 16)
    report = export_report(attn, (q, kv, kv))
    rows = {r.name: r for r in report.rows}
    assert rows["in_proj_weight[q]"].positions == 12
    assert rows["in_proj_weight[k]"].positions == rows["in_proj_weight[v]"].positions == 18
    assert rows["out_proj.weight"].positions == 12 and rows["out_proj.weight"].numel == 256


# -- end to end with the public training API ------------------------------------------------------


def test_end_to_end_sparsify_train_finalize_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4))
    ts.sparsify(model)
    opt = ts.DualAveraging(torch.optim.SGD(model.parameters(), lr=0.1), model, sparsity=0.9,
                           total_steps=20)
    data = torch.randn(20, 8, 32)
    for x in data:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    with pytest.raises(ValueError, match="ts.finalize"):
        to_sparse(model, "csr")
    ts.finalize(model)
    x = torch.randn(8, 32)
    with torch.no_grad():
        ref = model(x)
    info = save_sparse(model, tmp_path / "model.pt")
    assert info.file_bytes < info.dense_bytes
    summary = to_sparse(model, "csr", min_sparsity=0.5)
    assert any(r.layout == "csr" for r in summary.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    fresh = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4))
    load_sparse(fresh, tmp_path / "model.pt")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref)
    assert export_report(model, x).flop_reduction > 3


@pytest.mark.parametrize("name", ["torchspartan.sparse_layers", "torchspartan.export",
                                  "torchspartan.sparse_checkpoint", "torchspartan.cost_report"])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"no examples found in {name}"
    assert result.failed == 0, f"{result.failed} doctest failures in {name}"


def test_sparsity_report_carries_flops_and_bytes() -> None:
    model = nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
    with torch.no_grad():
        model[0].weight[:, 10:] = 0
    report = ts.sparsity_report(model, torch.randn(4, 100))
    assert report.cost is not None
    assert (report.cost.dense_flops, report.cost.sparse_flops) == (88000, 16000)
    assert "FLOPs 5.50x fewer" in str(report)
    assert ts.sparsity_report(model).cost is None
