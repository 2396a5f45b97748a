"""``rebasin merge``: N safetensors files in, one merged model out, bad inputs named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from rebasin.matching import weight_matching
from rebasin.merge import merge_many, merge_to_reference
from rebasin.norm import reset_batchnorm_stats
from rebasin.permute import apply_permutation, random_perms
from rebasin.zoo import build_model
from server.app import model_identity
from server.checkpoint import save_checkpoint
from server.config import ServerConfig
from simulations.cli import app
from simulations.merge_cli import BATCHNORM_WARNING
from simulations.merge_run import batchnorm_batches

MLP_ARGS = ["--model", "mlp", "--dataset", "mnist", "--width", "0.125"]
VGG_ARGS = ["--model", "vgg", "--dataset", "cifar10", "--width", "0.0625", "--norm", "batch"]


def _mlp(seed: int, width: float = 0.125) -> torch.nn.Module:
    return build_model("mlp", "mnist", width=width, seed=seed)


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _merge(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["merge", *map(str, args)])
    assert "Traceback" not in result.output
    if result.exit_code != 0:
        assert isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _flat(output: str) -> str:
    """The output as one line: rich's boxes and line wrapping removed."""
    for ch in "│╭╮╰╯─":
        output = output.replace(ch, " ")
    return " ".join(output.split())


def _permuted_copies(tmp_path: Path) -> tuple[torch.nn.Module, dict, list[Path]]:
    """The original MLP as file 0, two differently permuted copies of it as files 1 and 2."""
    model = _mlp(0)
    state = model.state_dict()
    spec = model.permutation_spec()
    files = [_save(state, tmp_path / "original.safetensors")]
    for seed in (1, 2):
        permuted = apply_permutation(spec, random_perms(spec, state, seed=seed), state)
        assert not torch.equal(permuted["layers.0.weight"], state["layers.0.weight"])
        files.append(_save(permuted, tmp_path / f"permuted-{seed}.safetensors"))
    return model, state, files


def test_permuted_copies_merge_back_to_the_original_by_reference(tmp_path: Path) -> None:
    _, state, files = _permuted_copies(tmp_path)
    out = tmp_path / "merged.safetensors"
    code, output = _merge(*files, *MLP_ARGS, "--out", out)
    assert code == 0, output
    merged = load_file(str(out))
    assert merged.keys() == state.keys()
    for key in state:
        torch.testing.assert_close(merged[key], state[key], atol=1e-7, rtol=0)
    assert "re-basin merge to input 0" in _flat(output)

    # Another reference: the result is that (permuted) copy, exactly.
    out1 = tmp_path / "merged-to-1.safetensors"
    code, output = _merge(*files, *MLP_ARGS, "--reference", "1", "--out", out1)
    assert code == 0, output
    copy1 = load_file(str(files[1]))
    merged1 = load_file(str(out1))
    for key in copy1:
        torch.testing.assert_close(merged1[key], copy1[key], atol=1e-7, rtol=0)


def test_permuted_copies_merge_back_to_the_original_by_merge_many(tmp_path: Path) -> None:
    model, state, files = _permuted_copies(tmp_path)
    out = tmp_path / "merged.safetensors"
    code, output = _merge(*files, *MLP_ARGS, "--method", "merge-many", "--out", out)
    assert code == 0, output
    merged = load_file(str(out))
    # MergeMany has no reference: the result is the original up to one permutation.
    spec = model.permutation_spec()
    back = apply_permutation(spec, weight_matching(spec, state, merged).perms, merged)
    for key in state:
        torch.testing.assert_close(back[key], state[key], atol=1e-7, rtol=0)
    x = torch.randn(16, 1, 28, 28)
    merged_model = _mlp(5)
    merged_model.load_state_dict(merged, strict=True)
    torch.testing.assert_close(merged_model(x), model(x), atol=1e-5, rtol=0)
    assert "MergeMany, " in _flat(output)


@pytest.mark.parametrize("method", ["reference", "merge-many"])
def test_weights_are_applied_as_the_library_applies_them(tmp_path: Path, method: str) -> None:
    a, b = _mlp(0).state_dict(), _mlp(1).state_dict()
    files = [_save(a, tmp_path / "a.safetensors"), _save(b, tmp_path / "b.safetensors")]
    out = tmp_path / "merged.safetensors"
    args = [*files, *MLP_ARGS, "--method", method, "--weights", "1", "3", "--seed", "4"]
    code, output = _merge(*args, "--max-iter", "50", "--out", out)
    assert code == 0, output

    spec = _mlp(0).permutation_spec()
    if method == "reference":
        expected = merge_to_reference(spec, [a, b], weights=[1, 3], seed=4, max_iter=50)
    else:
        expected = merge_many(spec, [a, b], weights=[1, 3], seed=4, max_iter=50)
    merged = load_file(str(out))
    assert merged.keys() == expected.keys()
    for key in expected:
        assert torch.equal(merged[key], expected[key]), key
    # ... and not the equal-weight merge.
    equal = merge_to_reference(spec, [a, b], seed=4, max_iter=50)
    assert not torch.equal(merged["layers.0.weight"], equal["layers.0.weight"])
    flat = _flat(output)
    assert "25.0%" in flat and "75.0%" in flat


def test_output_loads_strictly_and_carries_its_metadata(tmp_path: Path) -> None:
    files = [_save(_mlp(s).state_dict(), tmp_path / f"client-{s}.safetensors") for s in (0, 1, 2)]
    out = tmp_path / "sub" / "merged.safetensors"  # a missing directory is created
    code, output = _merge(*files, *MLP_ARGS, "--weights", "2", "1", "1", "--out", out)
    assert code == 0, output
    model = _mlp(9)
    model.load_state_dict(load_file(str(out)), strict=True)
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata.pop("command").startswith("rebasin ")
    assert metadata == {
        "format": "rebasin-fl-merged/1",
        "method": "reference",
        "model": "mlp",
        "dataset": "mnist",
        "width": "0.125",
        "norm": "batch",
        "inputs": json.dumps([str(f) for f in files]),
        "weights": "[2.0, 1.0, 1.0]",
        "reference": "0",
        "seed": "0",
        "max_iter": "100",
        "max_rounds": "",
        "batchnorm": "none",
    }
    assert f"wrote {out} (reference, 3 models, BatchNorm statistics: none)" in _flat(output)
    assert BATCHNORM_WARNING not in output  # no BatchNorm in an MLP


def _clients(tmp_path: Path, n: int = 3) -> list[Path]:
    return [_save(_mlp(s).state_dict(), tmp_path / f"c{s}.safetensors") for s in range(n)]


def _server_checkpoints(
    tmp_path: Path, n: int = 2, width: float = 0.125, **config: str
) -> list[Path]:
    """``n`` MLP checkpoints written as the ServerApp writes them, one run directory each."""
    identity = model_identity(ServerConfig(model="mlp", dataset="mnist", width=width, **config))
    return [
        save_checkpoint(tmp_path / f"run{s}", 5, _mlp(s, width).state_dict(), identity)
        for s in range(n)
    ]


def test_server_checkpoints_merge_without_the_architecture_options(tmp_path: Path) -> None:
    files = _server_checkpoints(tmp_path, 3)
    short, full = tmp_path / "short.safetensors", tmp_path / "full.safetensors"
    code, output = _merge(*files, "--out", short)
    assert code == 0, output
    assert "architecture from file metadata: mlp on mnist, width 0.125, norm batch" in output
    code, output = _merge(*files, *MLP_ARGS, "--norm", "batch", "--out", full)
    assert code == 0, output
    assert "architecture" not in output  # nothing came from the metadata
    merged, expected = load_file(str(short)), load_file(str(full))
    assert merged.keys() == expected.keys()
    for key in expected:
        assert torch.equal(merged[key], expected[key]), key
    # Some options given, the rest from the metadata; 0.1250 is the stored 0.125.
    partial = tmp_path / "partial.safetensors"
    code, output = _merge(*files, "--model", "mlp", "--width", "0.1250", "--out", partial)
    assert code == 0, output
    assert (
        "architecture: mlp on mnist, width 0.125, norm batch (dataset, norm from file metadata)"
    ) in output
    assert torch.equal(load_file(str(partial))["layers.0.weight"], merged["layers.0.weight"])


def test_a_merged_file_can_be_merged_again_without_options(tmp_path: Path) -> None:
    files = _server_checkpoints(tmp_path, 3)
    first = tmp_path / "first.safetensors"
    code, output = _merge(files[0], files[1], "--out", first)
    assert code == 0, output
    again, expected = tmp_path / "again.safetensors", tmp_path / "expected.safetensors"
    code, output = _merge(first, files[2], "--out", again)
    assert code == 0, output
    assert "architecture from file metadata: mlp on mnist, width 0.125, norm batch" in output
    # The merged file alone carries the whole architecture.
    bare = _save(_mlp(7).state_dict(), tmp_path / "bare.safetensors")
    code, output = _merge(first, bare, "--out", tmp_path / "with-bare.safetensors")
    assert code == 0, output
    assert "architecture from file metadata: mlp on mnist, width 0.125, norm batch" in output
    code, output = _merge(first, files[2], *MLP_ARGS, "--out", expected)
    assert code == 0, output
    merged, reference = load_file(str(again)), load_file(str(expected))
    for key in reference:
        assert torch.equal(merged[key], reference[key]), key
    with safe_open(str(again), framework="pt") as handle:
        metadata = handle.metadata()
    stored = {k: metadata[k] for k in ("model", "dataset", "width", "norm")}
    assert stored == {"model": "mlp", "dataset": "mnist", "width": "0.125", "norm": "batch"}


def test_inputs_whose_metadata_disagree_are_named(tmp_path: Path) -> None:
    narrow = _server_checkpoints(tmp_path / "narrow", 1)[0]
    wide = _server_checkpoints(tmp_path / "wide", 1, width=0.25)[0]
    bare = _save(_mlp(3).state_dict(), tmp_path / "bare.safetensors")  # no metadata: no vote
    out = tmp_path / "m.safetensors"
    code, output = _merge(narrow, bare, wide, "--out", out)
    assert code == 1
    assert output.strip() == f"Error: inputs disagree on width: {narrow} has 0.125, {wide} has 0.25"
    assert not out.exists()
    layer = _server_checkpoints(tmp_path / "layer", 1, norm="layer")[0]
    code, output = _merge(narrow, layer, "--out", out)
    assert code == 1
    assert (
        output.strip() == f"Error: inputs disagree on norm: {narrow} has batch, {layer} has layer"
    )


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--width", "1"], "its metadata has width 0.125, but --width is 1"),
        (["--norm", "layer"], "its metadata has norm batch, but --norm is layer"),
        (["--dataset", "cifar10"], "its metadata has dataset mnist, but --dataset is cifar10"),
        (["--model", "vgg"], "its metadata has model mlp, but --model is vgg"),
    ],
)
def test_an_option_that_contradicts_the_metadata_is_named(
    tmp_path: Path, option: list[str], message: str
) -> None:
    bare = _save(_mlp(3).state_dict(), tmp_path / "bare.safetensors")
    files = _server_checkpoints(tmp_path, 2)
    out = tmp_path / "m.safetensors"
    code, output = _merge(bare, *files, *option, "--out", out)
    assert code == 1
    assert output.strip() == f"Error: {files[0]}: {message}"
    assert not out.exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("width", "wide", "metadata width 'wide' is not a number > 0"),
        ("width", "0", "metadata width '0' is not a number > 0"),
        ("model", "bert", "metadata model 'bert' is not one of mlp, vgg, resnet20, vit"),
    ],
)
def test_bad_metadata_is_named(tmp_path: Path, key: str, value: str, message: str) -> None:
    files = _clients(tmp_path, 1)
    metadata = {"model": "mlp", "dataset": "mnist", "width": "0.125", key: value}
    state = {k: v.contiguous() for k, v in _mlp(1).state_dict().items()}
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata=metadata)
    code, output = _merge(*files, bad, "--out", tmp_path / "m.safetensors")
    assert code == 1
    assert output.strip() == f"Error: {bad}: {message}"


def test_no_model_or_dataset_anywhere_is_a_usage_error_naming_the_option(tmp_path: Path) -> None:
    files = _clients(tmp_path, 2)  # save_file without metadata
    out = tmp_path / "m.safetensors"
    code, output = _merge(*files, "--dataset", "mnist", "--out", out)
    assert code == 2
    flat = _flat(output)
    assert "Missing option '--model'. No input's metadata names the model: pass --model" in flat
    code, output = _merge(*files, "--model", "mlp", "--out", out)
    assert code == 2
    assert "Missing option '--dataset'." in _flat(output) and "pass --dataset" in _flat(output)
    assert not out.exists()


@pytest.mark.parametrize("options", [True, False])
def test_a_corrupt_file_is_named(tmp_path: Path, options: bool) -> None:
    # Without the options the metadata is read first: the same error.
    files = _clients(tmp_path, 2) if options else _server_checkpoints(tmp_path, 2)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
                        .to(torch.uint8).numpy().tobytes())  # fmt: skip
    out = tmp_path / "m.safetensors"
    args = MLP_ARGS if options else []
    code, output = _merge(files[0], corrupt, files[1], *args, "--out", out)
    assert code == 1
    assert output.startswith(f"Error: {corrupt}: not a readable safetensors file")
    assert len(output.strip().splitlines()) == 1
    assert not out.exists()


def test_a_state_dict_of_another_width_is_named_with_its_key(tmp_path: Path) -> None:
    files = _clients(tmp_path, 2)
    wide = _save(_mlp(3, width=0.25).state_dict(), tmp_path / "wide.safetensors")
    code, output = _merge(*files, wide, *MLP_ARGS, "--out", tmp_path / "m.safetensors")
    assert code == 1
    assert output.strip() == (
        f"Error: {wide}: 'layers.0.weight' has shape (128, 784), expected (64, 784)"
    )


def test_nan_is_named_with_file_and_key(tmp_path: Path) -> None:
    files = _clients(tmp_path, 2)
    state = _mlp(3).state_dict()
    state["layers.1.bias"][5] = math.nan
    bad = _save(state, tmp_path / "nan.safetensors")
    code, output = _merge(*files, bad, *MLP_ARGS, "--out", tmp_path / "m.safetensors")
    assert code == 1
    assert output.strip() == f"Error: {bad}: 'layers.1.bias' has 1 non-finite values (NaN or Inf)"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--weights", "1", "2"], "Invalid value for --weights: got 2 weights for 3 files"),
        (["--weights", "1", "0", "2"], "Invalid value for --weights: weights must be > 0"),
        (["--reference", "5"], "Invalid value for --reference: 5 is not an input index (0 to 2"),
        (
            ["--method", "merge-many", "--reference", "1"],
            "Invalid value for --reference: applies to --method reference only",
        ),
        (["--width", "0"], "Invalid value for --width: must be > 0, got 0"),
        (
            ["--weights", "1", "-2", "3"],
            "Invalid value for --weights: weights must be > 0 and finite, got -2",
        ),
        (
            ["--weights", "1", "inf", "3"],
            "Invalid value for --weights: weights must be > 0 and finite, got inf",
        ),
        (["--max-iter", "0"], "Invalid value for '--max-iter': 0 is not in the range x>=1."),
        (
            ["--max-norm-ratio", "inf"],
            "Invalid value for --max-norm-ratio: must be > 0 and finite, got inf",
        ),
        (
            ["--dataset", "cifar10", "--model", "vgg", "--norm", "layer", "--bn-data-dir", "."],
            "Invalid value for --bn-data-dir: model 'vgg' with --norm layer has no BatchNorm",
        ),
    ],  # fmt: skip
)
def test_bad_options_are_usage_errors_naming_the_option(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    files = _clients(tmp_path)
    out = tmp_path / "m.safetensors"
    code, output = _merge(*files, *MLP_ARGS, *extra, "--out", out)
    assert code == 2
    assert message in _flat(output)
    assert not out.exists()


@pytest.mark.parametrize("method", ["reference", "merge-many"])
def test_weights_whose_sum_overflows_give_the_equal_weight_merge(
    tmp_path: Path, method: str
) -> None:
    files = _clients(tmp_path)
    outs = [tmp_path / "huge.safetensors", tmp_path / "equal.safetensors"]
    for weights, out in ((["1e308"] * 3, outs[0]), (["1"] * 3, outs[1])):
        code, output = _merge(*files, *MLP_ARGS, "--method", method, "--weights", *weights,
                              "--out", out)  # fmt: skip
        assert code == 0, output
    huge, equal = load_file(str(outs[0])), load_file(str(outs[1]))
    assert all(torch.equal(huge[k], equal[k]) for k in equal)
    assert any(torch.count_nonzero(v) for v in huge.values())
    assert "33.3%" in output


@pytest.mark.parametrize(
    ("huge", "message"),
    [
        (
            lambda v: torch.full_like(v, 1e25),
            "'head.bias' holds a value of magnitude 1e+25, whose square overflows torch.float32",
        ),
        (lambda v: v * 1e4, "is more than max_norm_ratio = 1000 times the inputs' median's norm"),
    ],  # fmt: skip
)
def test_an_input_too_large_to_merge_is_named(tmp_path: Path, huge, message: str) -> None:
    files = _clients(tmp_path)
    _save({k: huge(v) for k, v in load_file(str(files[1])).items()}, files[1])
    out = tmp_path / "m.safetensors"
    code, output = _merge(*files, *MLP_ARGS, "--out", out)
    assert code == 1
    assert _flat(output).startswith(f"Error: input 1 ({files[1]}): ")
    assert message in _flat(output)
    assert not out.exists()


def test_inputs_that_pass_a_relaxed_bound_but_overflow_matching_are_named(
    tmp_path: Path,
) -> None:
    files = _clients(tmp_path)
    for path in files[1:]:
        _save({k: torch.full_like(v, 1.5e19) for k, v in load_file(str(path)).items()}, path)
    out = tmp_path / "m.safetensors"
    code, output = _merge(*files, *MLP_ARGS, "--reference", "1", "--max-norm-ratio", "1e30",
                          "--out", out)  # fmt: skip
    assert code == 1
    assert _flat(output) == (
        f"Error: input 2 ({files[2]}): weight matching failed: the matching objective is inf "
        "(weights too large for torch.float32 products)"
    )
    assert not out.exists()


def test_one_file_or_out_over_an_input_is_refused(tmp_path: Path) -> None:
    files = _clients(tmp_path, 2)
    code, output = _merge(files[0], *MLP_ARGS, "--out", tmp_path / "m.safetensors")
    assert code == 2
    assert "Invalid value for FILES: merge needs at least 2 files, got 1" in _flat(output)
    code, output = _merge(*files, *MLP_ARGS, "--out", files[1])
    assert code == 2
    assert "Invalid value for --out:" in _flat(output) and "is one of the input files" in output
    if not torch.cuda.is_available():
        code, output = _merge(*files, *MLP_ARGS, "--device", "cuda", "--out", tmp_path / "m")
        assert code == 2 and "Invalid value for --device: no CUDA device here" in _flat(output)


@pytest.mark.timeout(300)
def test_batchnorm_statistics_are_recomputed_or_flagged(
    tmp_path: Path, small_data_dir: Path
) -> None:
    data_dir = small_data_dir

    def vgg(seed: int) -> torch.nn.Module:
        return build_model("vgg", "cifar10", width=0.0625, norm="batch", seed=seed)

    files = [_save(vgg(s).state_dict(), tmp_path / f"vgg{s}.safetensors") for s in (0, 1)]
    plain_out, reset_out = tmp_path / "plain.safetensors", tmp_path / "reset.safetensors"
    code, output = _merge(*files, *VGG_ARGS, "--out", plain_out)
    assert code == 0, output
    assert _flat(BATCHNORM_WARNING) in _flat(output)
    bn_args = ["--bn-data-dir", data_dir, "--bn-examples", "64", "--bn-batch-size", "32"]
    code, output = _merge(*files, *VGG_ARGS, *bn_args, "--out", reset_out)
    assert code == 0, output
    assert "Warning" not in output
    assert "BatchNorm statistics: recomputed on 64 cifar10 training examples" in _flat(output)

    plain, reset = load_file(str(plain_out)), load_file(str(reset_out))
    stats = [k for k in plain if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * 8  # VGG-11: eight conv + BatchNorm layers
    for key in plain:
        if key.endswith(("running_mean", "running_var")):
            assert not torch.allclose(plain[key], reset[key]), key
        elif key.endswith("num_batches_tracked"):
            assert int(reset[key]) == 2  # 64 examples in batches of 32
        else:
            assert torch.equal(plain[key], reset[key]), key  # weights are not touched
    # The same statistics as RESET of the plain merge on the documented sample.
    expected = vgg(7)
    expected.load_state_dict(plain, strict=True)
    reset_batchnorm_stats(expected, batchnorm_batches("cifar10", data_dir, 64, 32, seed=0))
    for key, value in expected.state_dict().items():
        assert torch.equal(reset[key], value), key
    with safe_open(str(reset_out), framework="pt") as handle:
        assert handle.metadata()["batchnorm"] == "recomputed on 64 cifar10 training examples"
    with safe_open(str(plain_out), framework="pt") as handle:
        assert handle.metadata()["batchnorm"] == "averaged"
