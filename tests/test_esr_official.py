"""Loading the official ESR checkpoint set (siqueira-hc) into fer_lab's ESR models.

The official set is a directory: ``Net-Base-Shared_Representations.pt`` + ``Net-Branch_k.pt``.
Only the real base is shared (``../shared/data/esr_official``); branch files here are
random tensors of the official names and shapes. The official forward pass is written
out below, functionally, from its description (BGR input, BN in eval mode).
"""
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fer_lab.models import build_model, count_parameters
from fer_lab.models.pretrained import (ESR_OFFICIAL_BASE, PretrainedMismatchError, esr_official_key,
                                       load_pretrained)

SHARED_BASE = Path(__file__).resolve().parents[2] / "shared" / "data" / "esr_official" / ESR_OFFICIAL_BASE
BASE_LAYERS = ((3, 64, 5), (64, 128, 3), (128, 128, 3), (128, 128, 3))
BRANCH_LAYERS = ((128, 128, 3), (128, 256, 3), (256, 256, 3), (256, 512, 3))
ESR9_PARAMETERS = 20_349_384


# ---- official-format fixtures -------------------------------------------------------------
def _conv_bn(layers, gen) -> dict:
    sd = {}
    for j, (cin, cout, k) in enumerate(layers, start=1):
        sd[f"conv{j}.weight"] = torch.randn(cout, cin, k, k, generator=gen) * (2.0 / (cin * k * k)) ** 0.5
        sd[f"conv{j}.bias"] = 0.05 * torch.randn(cout, generator=gen)
    for j, (_, cout, _) in enumerate(layers, start=1):
        sd[f"bn{j}.weight"] = 1 + 0.1 * torch.randn(cout, generator=gen)
        sd[f"bn{j}.bias"] = 0.1 * torch.randn(cout, generator=gen)
        sd[f"bn{j}.running_mean"] = 0.1 * torch.randn(cout, generator=gen)
        sd[f"bn{j}.running_var"] = 0.5 + torch.rand(cout, generator=gen)
        sd[f"bn{j}.num_batches_tracked"] = torch.tensor(1000 + j, dtype=torch.int64)
    return sd


def random_base(seed: int = 0) -> dict:
    return _conv_bn(BASE_LAYERS, torch.Generator().manual_seed(seed))


def random_branch(seed: int, num_classes: int = 8) -> dict:
    gen = torch.Generator().manual_seed(seed)
    sd = _conv_bn(BRANCH_LAYERS, gen)
    sd["fc.weight"] = torch.randn(num_classes, 512, generator=gen) / 512 ** 0.5
    sd["fc.bias"] = 0.1 * torch.randn(num_classes, generator=gen)
    sd["fc_dimensional.weight"] = torch.randn(2, num_classes, generator=gen)
    sd["fc_dimensional.bias"] = torch.randn(2, generator=gen)
    return sd


def write_official(directory: Path, branches, base: str = "auto") -> Path:
    """An official-format set in ``directory``: base (``"real"``: the shared file copied,
    ``"random"``, ``"auto"``: real when present) and branch files ``Net-Branch_k.pt`` for k in
    ``branches``, saved in torch's legacy serialisation."""
    directory.mkdir(parents=True, exist_ok=True)
    if base == "real" or (base == "auto" and SHARED_BASE.is_file()):
        shutil.copyfile(SHARED_BASE, directory / ESR_OFFICIAL_BASE)
    else:
        torch.save(random_base(), directory / ESR_OFFICIAL_BASE, _use_new_zipfile_serialization=False)
    for k in branches:
        torch.save(random_branch(100 + k), directory / f"Net-Branch_{k}.pt", _use_new_zipfile_serialization=False)
    return directory


def read(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def esr9_set(tmp_path_factory):
    """A full 9-branch official set (real base when the shared file is present)."""
    return write_official(tmp_path_factory.mktemp("esr9_official"), range(1, 10))


# ---- the official forward pass, functional --------------------------------------------------
def _cbr(sd, x, j, padding=0):
    x = F.conv2d(x, sd[f"conv{j}.weight"], sd[f"conv{j}.bias"], padding=padding)
    x = F.batch_norm(x, sd[f"bn{j}.running_mean"], sd[f"bn{j}.running_var"], sd[f"bn{j}.weight"],
                     sd[f"bn{j}.bias"], training=False, eps=1e-5)
    return F.relu(x)


def official_base(sd, x_bgr):
    x = _cbr(sd, x_bgr, 1)
    x = F.max_pool2d(_cbr(sd, x, 2), 2, 2)
    x = _cbr(sd, x, 3)
    return F.max_pool2d(_cbr(sd, x, 4), 2, 2)


def official_branch(sd, shared):
    x = _cbr(sd, shared, 1)
    x = F.max_pool2d(_cbr(sd, x, 2), 2, 2)
    x = _cbr(sd, x, 3)
    x = _cbr(sd, x, 4, padding=1)
    return F.linear(x.mean(dim=(2, 3)), sd["fc.weight"], sd["fc.bias"])


def official_logits(directory: Path, num_branches: int, x_bgr):
    shared = official_base(read(directory / ESR_OFFICIAL_BASE), x_bgr)
    return torch.stack([official_branch(read(directory / f"Net-Branch_{k}.pt"), shared)
                        for k in range(1, num_branches + 1)])


# ---- tests ----------------------------------------------------------------------------------
def test_key_map():
    assert esr_official_key("conv1.weight") == "base.blocks.0.conv.weight"
    assert esr_official_key("bn4.num_batches_tracked") == "base.blocks.3.bn.num_batches_tracked"
    assert esr_official_key("conv4.bias", 9) == "branches.8.convs.blocks.3.conv.bias"
    assert esr_official_key("bn2.running_var", 1) == "branches.0.convs.blocks.1.bn.running_var"
    assert esr_official_key("fc.weight", 3) == "branches.2.fc.weight"
    assert esr_official_key("fc_dimensional.weight", 3) is None and esr_official_key("fc.weight") is None
    own = set(build_model("esr9", num_branches=2).state_dict())
    mapped = {esr_official_key(k) for k in random_base()}
    mapped |= {esr_official_key(k, b) for b in (1, 2) for k in random_branch(0) if not k.startswith("fc_dim")}
    assert mapped == own


def test_strict_load_of_esr9(esr9_set):
    model = build_model("esr9")
    report = load_pretrained(model, esr9_set)
    assert report["source"] == "esr_official" and report["requested_source"] == "auto"
    assert report["path"] == str(esr9_set) and not report["partial"]
    assert report["loaded"] == 28 + 9 * 30 == len(report["loaded_keys"]) == len(model.state_dict())
    assert report["loaded_parameters"] == report["model_parameters"] == count_parameters(model) == ESR9_PARAMETERS
    assert report["dropped"] == sorted(f"Net-Branch_{k}.pt:fc_dimensional.{p}" for k in range(1, 10)
                                       for p in ("weight", "bias"))
    assert report["missing"] == report["unexpected"] == report["not_in_source"] == report["ignored"] == []
    assert report["mismatched"] == {} and report["missing_files"] == []
    assert report["channel_order"] == "rgb" and report["converted"] == ["base.blocks.0.conv.weight"]
    assert set(report["files"]) == {ESR_OFFICIAL_BASE} | {f"Net-Branch_{k}.pt" for k in range(1, 10)}
    assert len(report["sha256"]) == 64
    # every tensor is the file's (the first conv with its input channels reversed)
    got = model.state_dict()
    base = read(esr9_set / ESR_OFFICIAL_BASE)
    for key, value in base.items():
        want = value.flip(1) if key == "conv1.weight" else value
        assert torch.equal(got[esr_official_key(key)], want), key
    branch9 = read(esr9_set / "Net-Branch_9.pt")
    for key, value in branch9.items():
        if not key.startswith("fc_dimensional"):
            assert torch.equal(got[esr_official_key(key, 9)], value), key


@pytest.mark.parametrize("channel_order", ["rgb", "bgr"])
def test_logits_equal_the_official_forward(esr9_set, channel_order):
    torch.manual_seed(0)
    model = build_model("esr9", num_branches=2)
    report = load_pretrained(model, esr9_set, channel_order=channel_order)
    assert report["channel_order"] == channel_order
    assert report["ignored"] == [f"Net-Branch_{k}.pt" for k in range(3, 10)]
    model.eval()
    x_rgb = torch.rand(2, 3, 96, 96)
    x_bgr = x_rgb[:, [2, 1, 0]]
    with torch.no_grad():
        got = model(x_rgb if channel_order == "rgb" else x_bgr).branch_logits
        want = official_logits(esr9_set, 2, x_bgr)
    assert got.shape == want.shape == (2, 2, 8)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the conversion matters: an RGB-converted model fed BGR gives other logits
    if channel_order == "rgb":
        with torch.no_grad():
            assert not torch.allclose(model(x_bgr).branch_logits, want, atol=1e-3)


@pytest.mark.skipif(not SHARED_BASE.is_file(), reason=f"{SHARED_BASE} not present")
def test_real_shared_base(tmp_path):
    directory = write_official(tmp_path / "set", [1], base="real")
    model = build_model("esr9", num_branches=1)
    report = load_pretrained(model, directory / ESR_OFFICIAL_BASE)            # the base file itself
    assert report["path"] == str(directory) and report["source"] == "esr_official"
    assert report["files"][ESR_OFFICIAL_BASE] == hashlib.sha256(SHARED_BASE.read_bytes()).hexdigest()
    base = read(SHARED_BASE)
    assert len(base) == 28
    assert sum(v.numel() for k, v in base.items() if "running" not in k and "num_batches" not in k) == 374_784
    got = model.state_dict()
    for key, value in base.items():
        want = value.flip(1) if key == "conv1.weight" else value
        assert torch.equal(got[esr_official_key(key)], want.cpu()), key
    model.eval()
    torch.manual_seed(1)
    x_rgb = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        shared, _ = model.base(x_rgb)
        want = official_base(base, x_rgb[:, [2, 1, 0]])
    assert shared.shape == want.shape == (2, 128, 20, 20)
    torch.testing.assert_close(shared, want, atol=1e-4, rtol=1e-4)


def test_attention_variant_loads_all_but_cbam(esr9_set):
    torch.manual_seed(0)
    model = build_model("esr9_div", num_branches=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained(model, esr9_set)                                 # no allow_partial needed
    cbam = sorted(k for k in before if ".cbam." in k)
    assert cbam and report["not_in_source"] == cbam
    assert report["loaded_keys"] == sorted(k for k in before if ".cbam." not in k)
    assert all(any(f".{part}." in k for part in ("conv", "bn", "fc")) for k in report["loaded_keys"])
    assert report["missing"] == report["unexpected"] == [] and not report["partial"]
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in cbam)
    assert not torch.equal(after["branches.1.fc.weight"], before["branches.1.fc.weight"])


def test_extra_branch_files_are_ignored(esr9_set):
    model = build_model("esr9", num_branches=4)
    report = load_pretrained(model, esr9_set, source="esr_official")
    assert report["ignored"] == [f"Net-Branch_{k}.pt" for k in range(5, 10)]
    assert report["loaded"] == 28 + 4 * 30 and set(report["files"]) == {ESR_OFFICIAL_BASE} | {
        f"Net-Branch_{k}.pt" for k in range(1, 5)}


def test_missing_branch_files(tmp_path):
    directory = write_official(tmp_path / "two", [1, 2])
    model = build_model("esr9", num_branches=4)
    before = model.branches[2].fc.weight.clone()
    with pytest.raises(PretrainedMismatchError, match=r"Net-Branch_3\.pt") as err:
        load_pretrained(model, directory)
    assert "Net-Branch_4.pt" in str(err.value) and "branches.2.convs.blocks.0.conv.weight" in str(err.value)
    assert "branches.3.fc.weight" in err.value.missing
    assert not any(k.startswith(("branches.0.", "branches.1.", "base.")) for k in err.value.missing)
    assert torch.equal(model.branches[2].fc.weight, before)                   # nothing loaded
    report = load_pretrained(model, directory, allow_partial=True)
    assert report["partial"] and report["missing_files"] == ["Net-Branch_3.pt", "Net-Branch_4.pt"]
    assert torch.equal(model.branches[2].fc.weight, before)
    assert torch.equal(model.branches[1].fc.weight, read(directory / "Net-Branch_2.pt")["fc.weight"])


def test_allow_partial_that_loads_nothing_is_an_error(tmp_path, esr9_set):
    torch.save({"encoder.weight": torch.randn(4, 4), "encoder.bias": torch.randn(4)}, tmp_path / "other.pt")
    model = build_model("esr9", num_branches=1)
    with pytest.raises(PretrainedMismatchError, match="nothing matched") as err:
        load_pretrained(model, tmp_path / "other.pt", allow_partial=True)
    assert "encoder.weight" in str(err.value) and "base.blocks.0.conv.weight" in str(err.value)
    # a fer_lab checkpoint of another width: only shapeless BN counters and 8-wide fc biases would fit...
    small = build_model("esr9", num_branches=1, width=0.25, num_classes=3)
    torch.save({"model": small.state_dict(), "model_config": small.config}, tmp_path / "small.pt")
    with pytest.raises(PretrainedMismatchError, match="nothing matched"):
        load_pretrained(build_model("esr9", num_branches=1, width=0.5), tmp_path / "small.pt", allow_partial=True)
    # the official set maps onto ESR only
    with pytest.raises(ValueError, match="ESR"):
        load_pretrained(build_model("manet", input_size=112), esr9_set)


def test_new_heads(esr9_set, tmp_path):
    torch.manual_seed(0)
    model = build_model("esr9", num_classes=7, num_branches=2)
    with pytest.raises(PretrainedMismatchError, match="new_heads=True") as err:
        load_pretrained(model, esr9_set)
    assert "--init-new-heads" in str(err.value) and set(err.value.mismatched) == {
        f"branches.{b}.fc.{p}" for b in (0, 1) for p in ("weight", "bias")}
    heads = {k: v.clone() for k, v in model.state_dict().items() if ".fc." in k}
    report = load_pretrained(model, esr9_set, new_heads=True)
    assert report["new_heads"] and not report["partial"] and report["mismatched"] == {}
    assert report["not_in_source"] == sorted(heads)
    assert report["loaded_keys"] == sorted(k for k in model.state_dict() if k not in heads)
    assert {f"Net-Branch_{b}.pt:fc.{p}" for b in (1, 2) for p in ("weight", "bias")} <= set(report["dropped"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in heads.items())
    # fer_lab checkpoints, ESR and MA-Net
    src = build_model("esr9_div", num_branches=2, width=0.25)
    torch.save({"model": src.state_dict(), "model_config": src.config}, tmp_path / "best.pt")
    dst = build_model("esr9_div", num_branches=2, width=0.25, num_classes=7)
    report = load_pretrained(dst, tmp_path / "best.pt", new_heads=True)
    assert report["source"] == "fer_lab" and not report["partial"]
    assert report["dropped"] == report["not_in_source"] == sorted(k for k in src.state_dict() if ".fc." in k)
    manet = build_model("manet", input_size=112)
    torch.save(manet.state_dict(), tmp_path / "manet.pt")
    other = build_model("manet", input_size=112, num_classes=8)
    with pytest.raises(PretrainedMismatchError, match="new_heads"):
        load_pretrained(other, tmp_path / "manet.pt")
    report = load_pretrained(other, tmp_path / "manet.pt", new_heads=True)
    assert report["dropped"] == report["not_in_source"] == [f"{h}.{p}" for h in ("fc_global", "fc_local")
                                                            for p in ("bias", "weight")]
    assert torch.equal(other.stem.conv1.weight, manet.stem.conv1.weight)


def test_directory_without_base_file(tmp_path):
    (tmp_path / "empty").mkdir()
    torch.save(random_branch(1), tmp_path / "empty" / "Net-Branch_1.pt", _use_new_zipfile_serialization=False)
    model = build_model("esr9", num_branches=1)
    for source in ("esr_official", "auto"):
        with pytest.raises(FileNotFoundError, match=ESR_OFFICIAL_BASE):
            load_pretrained(model, tmp_path / "empty", source=source)
    with pytest.raises(FileNotFoundError, match=ESR_OFFICIAL_BASE):
        load_pretrained(model, tmp_path / "nowhere", source="esr_official")


def test_options_checked(esr9_set, tmp_path):
    small = build_model("esr9", num_branches=1, width=0.5)
    with pytest.raises(PretrainedMismatchError, match="width 1.0") as err:
        load_pretrained(small, esr9_set)
    assert "new_heads" not in str(err.value)                                # 8 classes on both sides
    with pytest.raises(ValueError, match="in_channels"):
        load_pretrained(build_model("esr9", num_branches=1, in_channels=1), esr9_set)
    with pytest.raises(ValueError, match="channel_order"):
        load_pretrained(small, esr9_set, channel_order="gbr")
    src = build_model("esr9", num_branches=1, width=0.25)
    torch.save({"model": src.state_dict(), "model_config": src.config}, tmp_path / "best.pt")
    dst = build_model("esr9", num_branches=1, width=0.25)
    with pytest.raises(ValueError, match="channel_order='bgr'"):
        load_pretrained(dst, tmp_path / "best.pt", channel_order="bgr")
    report = load_pretrained(dst, tmp_path / "best.pt")                     # fer_lab: loaded_keys too
    assert report["loaded_keys"] == sorted(src.state_dict()) and report["not_in_source"] == []
    assert report["channel_order"] == "rgb" and "converted" not in report


def test_msceleb_into_descending_manet_warns(tmp_path):
    src = build_model("manet", input_size=112)
    state = {f"module.{k}": v for k, v in src.state_dict().items() if not k.startswith("fc_")}
    torch.save({"state_dict": state}, tmp_path / "msceleb.pth.tar")
    with pytest.warns(UserWarning, match="ascending"):
        report = load_pretrained(build_model("manet", input_size=112, chain_order="descending"),
                                 tmp_path / "msceleb.pth.tar")
    assert report["source"] == "msceleb" and report["not_in_source"] == [
        f"{h}.{p}" for h in ("fc_global", "fc_local") for p in ("bias", "weight")]
