"""MA-Net: parameter counts from SPEC, patch geometry, the loss, initial weights, training."""
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fer_lab.diversity import diversity
from fer_lab.models import MANet, build_model, build_model_from_config, count_parameters, model_spec
from fer_lab.models.manet import check_input_size, split_patches, stem_output_size, tile_patches
from fer_lab.models.pretrained import PretrainedMismatchError, load_pretrained, msceleb_key


@pytest.fixture(scope="module")
def manet7():
    torch.manual_seed(0)
    return build_model("manet")


@pytest.fixture
def flush_denormal():
    """Denormal gradients of saturated diversity terms make CPU backward passes ~20x slower."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def test_parameter_counts(manet7):
    assert count_parameters(manet7) == 50_547_214
    assert count_parameters(build_model("manet_div", num_classes=8)) == 50_548_240
    assert count_parameters(manet7.stem) == 683_072
    assert all(count_parameters(p) == 10_577_392 for p in manet7.patches) and len(manet7.patches) == 4
    assert count_parameters(manet7.global_branch) == 7_547_392
    assert count_parameters(manet7.fc_local) == count_parameters(manet7.fc_global) == 512 * 7 + 7


def test_registry_variants():
    spec = model_spec("manet_div")
    assert spec.defaults["input_size"] == 224 and spec.data["train_transform"] == "manet_train"
    assert spec.data["protocol"] == "single" and spec.data["label_space"] is None
    m = build_model("manet_div", input_size=112, gamma=2.0, chain_order="ascending")
    assert m.diversity.terms == ("spatial", "channel", "branch") and m.diversity.gamma == 2.0
    assert build_model("manet").diversity.terms == ()
    again = build_model_from_config(m.config)
    assert again.config == m.config and isinstance(again, MANet)


def test_shapes_224(manet7):
    manet7.eval()
    with torch.no_grad():
        out = manet7(torch.rand(2, 3, 224, 224))
    assert out.logits.shape == out.local_logits.shape == out.global_logits.shape == (2, 7)
    assert out.patch_maps.shape == (4, 2, 512, 7, 7)
    assert out.local_features.shape == out.global_features.shape == (2, 512)
    assert out.patch_spatial_attention.shape == (4, 2, 7, 7)
    assert out.patch_channel_attention.shape == (4, 2, 512)
    assert out.tiled_spatial_attention.shape == (2, 14, 14)
    torch.testing.assert_close(out.logits, 0.6 * out.local_logits + 0.4 * out.global_logits)
    # the local feature is the pooled re-tiled map = mean of the four patches' pooled maps
    torch.testing.assert_close(out.local_features, out.patch_maps.mean(dim=(3, 4)).mean(dim=0))
    torch.testing.assert_close(manet7.fc_local(out.local_features), out.local_logits)
    assert set(manet7.heads(out)) == {"fused", "local", "global"} and manet7.main_head == "fused"


def test_macs_at_224(manet7):
    from torch.utils.flop_counter import FlopCounterMode

    manet7.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        manet7(torch.rand(1, 3, 224, 224))
    assert counter.get_total_flops() / 2e9 == pytest.approx(3.64, abs=0.01)       # SPEC: 3.64 GMACs


def test_shapes_112_and_bad_sizes():
    m = build_model("manet", input_size=112).eval()
    with torch.no_grad():
        out = m(torch.rand(3, 3, 112, 112))
    assert out.patch_maps.shape == (4, 3, 512, 4, 4) and out.logits.shape == (3, 7)
    assert stem_output_size(224) == 28 and stem_output_size(112) == 14
    assert check_input_size(224) == (28, 28) and check_input_size(128, 96) == (16, 12)
    with pytest.raises(ValueError, match=r"100x100 px.*13x13.*96 or 105"):
        m(torch.rand(1, 3, 100, 100))
    with pytest.raises(ValueError, match="100x100 px"):
        build_model("manet", input_size=100)


def test_split_and_tile_are_inverse():
    x = torch.arange(2 * 3 * 6 * 8, dtype=torch.float32).view(2, 3, 6, 8)
    patches = split_patches(x)
    assert [p.shape for p in patches] == [(2, 3, 3, 4)] * 4
    torch.testing.assert_close(patches[1], x[..., :3, 4:])               # row-major: top-right second
    torch.testing.assert_close(tile_patches(torch.stack(patches)), x)


def test_chain_order_changes_outputs_not_parameters():
    torch.manual_seed(1)
    a = build_model("manet", input_size=112).eval()
    assert a.chain_order == "ascending"            # the diversity paper's diversified_manet.py
    b = build_model("manet", input_size=112, chain_order="descending").eval()
    assert count_parameters(a) == count_parameters(b)
    b.load_state_dict(a.state_dict())                        # same weights, same checkpoint layout
    x = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        oa, ob = a(x), b(x)
    torch.testing.assert_close(oa.local_logits, ob.local_logits)           # the local branch is unaffected
    assert not torch.allclose(oa.global_features, ob.global_features)
    with pytest.raises(ValueError, match="chain_order"):
        build_model("manet", chain_order="sideways")


def _independent_loss(model, out, y, normalize):
    def prep(f):
        f = f.reshape(f.shape[0], f.shape[1], -1)
        return F.normalize(f, dim=-1) if normalize == "l2" else f

    ce = 0.6 * F.cross_entropy(out.local_logits, y) + 0.4 * F.cross_entropy(out.global_logits, y)
    feats = {"spatial": out.patch_maps.mean(dim=2), "channel": out.patch_maps.mean(dim=(3, 4)),
             "branch": torch.stack([out.local_features, out.global_features])}
    D = {t: diversity(prep(f), gamma=model.diversity.gamma)[0] for t, f in feats.items()}
    return ce, D


@pytest.mark.parametrize("options", [{}, {"diversity_normalize": "l2", "gamma": 1.0},
                                     {"diversity_terms": ["branch"], "diversity_normalize": "l2"}])
def test_loss_matches_independent_computation(options):
    torch.manual_seed(0)
    m = build_model("manet_div", input_size=112, **options).eval()
    x, y = torch.rand(4, 3, 112, 112), torch.tensor([0, 3, 6, 3])
    with torch.no_grad():
        out = m(x)
        lo = m.loss(out, y)
    ce, D = _independent_loss(m, out, y, m.diversity.normalize)
    terms = m.diversity.terms
    torch.testing.assert_close(lo.total, ce - sum(D[t] for t in terms))
    torch.testing.assert_close(lo.ce_total, ce)
    assert lo.in_loss == terms and set(lo.diversity) == {"spatial", "channel", "branch"}
    for t in D:                                              # terms not in the loss are monitored
        torch.testing.assert_close(lo.diversity[t], D[t])
    assert lo.similarity["spatial"].shape == (4, 4) and lo.similarity["branch"].shape == (2, 2)
    torch.testing.assert_close(lo.ce["local"], F.cross_entropy(out.local_logits, y))


def test_msceleb_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    source = build_model("manet", input_size=112)
    state = {f"module.{k}": v.clone() for k, v in source.state_dict().items() if not k.startswith("fc_")}
    for head in ("fc_local", "fc_global"):
        state[f"module.{head}.weight"] = torch.randn(12666, 512)
        state[f"module.{head}.bias"] = torch.randn(12666)
    torch.save({"state_dict": state, "epoch": 10}, tmp_path / "msceleb.pth.tar")
    target = build_model("manet", input_size=112)
    heads = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("fc_")}
    report = load_pretrained(target, tmp_path / "msceleb.pth.tar")
    assert report["source"] == "msceleb" and not report["partial"] and report["missing"] == []
    heads_in_file = [f"{h}.{p}" for h in ("fc_local", "fc_global") for p in ("weight", "bias")]
    assert sorted(report["dropped"]) == sorted(heads_in_file)
    want, got = source.state_dict(), target.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want if not k.startswith("fc_"))
    assert all(torch.equal(heads[k], got[k]) for k in heads)             # heads untouched

    # a file with a key missing and one extra: refused with both keys listed, unless partial
    del state["module.patches.2.layer4.1.conv2.weight"]
    state["module.extra_head.weight"] = torch.zeros(3)
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    fresh = build_model("manet", input_size=112)
    before = fresh.stem.conv1.weight.clone()
    with pytest.raises(PretrainedMismatchError, match=r"patches\.2\.layer4\.1\.conv2\.weight") as err:
        load_pretrained(fresh, tmp_path / "bad.pth")
    assert "extra_head.weight" in str(err.value) and torch.equal(fresh.stem.conv1.weight, before)
    report = load_pretrained(fresh, tmp_path / "bad.pth", allow_partial=True)
    assert report["partial"] and report["unexpected"] == ["extra_head.weight"]
    assert torch.equal(fresh.stem.conv1.weight, want["stem.conv1.weight"])


def test_public_manet_names_are_translated():
    assert msceleb_key("layer3_1_p2.0.cbam.ChannelGate.mlp.1.weight") == \
        "patches.1.layer3.0.cbam.channel_gate.mlp.0.weight"
    assert msceleb_key("layer4_1_p4.1.cbam.SpatialGate.spatial.bn.running_var") == \
        "patches.3.layer4.1.cbam.spatial_gate.bn.running_var"
    assert msceleb_key("layer4_2.1.conv2_2_3.weight") == "global_branch.layer4.1.chains.1.2.conv.weight"
    assert msceleb_key("layer3_2.0.downsample.1.bias") == "global_branch.layer3.0.downsample.1.bias"
    assert msceleb_key("layer2.0.downsample.0.weight") == "stem.layer2.0.downsample.0.weight"
    assert msceleb_key("fc_1.weight") == "fc_local.weight" and msceleb_key("fc_2.bias") == "fc_global.bias"
    own = set(build_model("manet", input_size=112).state_dict())
    for k in ("patches.1.layer3.0.cbam.channel_gate.mlp.0.weight", "global_branch.layer4.1.chains.1.2.conv.weight",
              "patches.3.layer4.1.cbam.spatial_gate.bn.running_var"):
        assert k in own


def test_torchvision_resnet18_loads_into_stem(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(tv, tmp_path / "resnet18.pth")
    m = build_model("manet", input_size=112)
    patch_before = m.patches[0].layer3[0].conv1.weight.clone()
    report = load_pretrained(m, tmp_path / "resnet18.pth")
    assert report["source"] == "torchvision" and report["loaded_parameters"] == 683_072
    assert all(k.startswith(("layer3.", "layer4.", "fc.")) for k in report["ignored"])
    for k in ("conv1.weight", "bn1.running_mean", "layer1.1.conv2.weight", "layer2.0.downsample.0.weight"):
        assert torch.equal(m.state_dict()[f"stem.{k}"], tv[k])
    assert torch.equal(m.patches[0].layer3[0].conv1.weight, patch_before)


def test_fer_lab_checkpoint_new_heads_need_partial(tmp_path):
    src = build_model("esr9_div", num_branches=2, width=0.25)
    torch.save({"model": src.state_dict(), "model_config": src.config}, tmp_path / "best.pt")
    dst = build_model("esr9_div", num_branches=2, width=0.25, num_classes=7)
    with pytest.raises(PretrainedMismatchError, match=r"branches\.0\.fc\.weight"):
        load_pretrained(dst, tmp_path / "best.pt")
    report = load_pretrained(dst, tmp_path / "best.pt", allow_partial=True)
    assert report["source"] == "fer_lab" and set(report["mismatched"]) == {f"branches.{b}.fc.{p}" for b in (0, 1)
                                                                          for p in ("weight", "bias")}
    assert torch.equal(dst.base.blocks[0].conv.weight, src.base.blocks[0].conv.weight)
    with pytest.raises(ValueError, match="MA-Net"):
        load_pretrained(dst, tmp_path / "best.pt", source="msceleb")


def test_a_few_sgd_steps_lower_the_loss(flush_denormal):
    from fer_lab.data import build_dataset, build_transform

    torch.manual_seed(0)
    ds = build_dataset("synthetic", split="train", transform=build_transform("eval", 112), size=112, num_samples=16,
                       cache=None)
    batches = [(torch.stack([ds[i][0] for i in range(j, j + 8)]),
                torch.as_tensor([int(ds[i][1]) for i in range(j, j + 8)])) for j in (0, 8)]
    m = build_model("manet_div", input_size=112, num_classes=8, diversity_normalize="l2").train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    losses = []
    for step in range(12):
        x, y = batches[step % 2]
        lo = m.loss(m(x), y)
        opt.zero_grad()
        lo.total.backward()
        opt.step()
        losses.append(float(lo.total.detach()))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1, losses


def test_engine_run_records_manet_columns_and_init_weights(tmp_path, flush_denormal):
    import json

    import torchvision

    from fer_lab.train import TrainConfig, train

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    torch.save({"state_dict": {"module.nothing.weight": torch.zeros(2)}}, tmp_path / "wrong.pth")
    common = dict(model="manet_div", dataset="synthetic", image_size=112, model_options={"num_classes": 8},
                  data_options={"num_samples": 32}, epochs=1, batch_size=16, eval_batch_size=32, lr=0.01,
                  output_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"), progress=False,
                  figures=False)
    with pytest.raises(PretrainedMismatchError, match="nothing.weight"):
        train(TrainConfig(**common, name="bad", init_weights=str(tmp_path / "wrong.pth")))
    assert not (tmp_path / "runs" / "bad").exists()          # refused before the run directory was made

    path = train(TrainConfig(**common, name="manet", init_weights=str(tmp_path / "resnet18.pth")))
    h = pd.read_csv(path / "history.csv")
    for col in ("train_D_b", "train_D_sp", "train_D_ch", "train_acc_fused", "train_acc_local", "train_acc_global",
                "train_gradnorm_D_b", "val_D_sp"):
        assert col in h.columns, col
    assert (path / "checkpoints" / "best.pt").is_file()
    report = json.loads((path / "init_weights.json").read_text())
    assert report["source"] == "torchvision" and report["loaded_parameters"] == 683_072


def test_presets_and_cli_preset_option():
    from fer_lab.cli import build_parser, config_from_args
    from fer_lab.presets import PRESETS
    from fer_lab.train import TrainConfig

    assert set(PRESETS) >= {"esr_affectnet", "manet_rafdb", "manet_affectnet"}
    c = TrainConfig.from_preset("manet_rafdb", epochs=3)
    f = c.flat()
    assert (c.model, f["lr"], f["momentum"], f["weight_decay"], f["lr_step"], f["lr_gamma"], f["batch_size"],
            f["epochs"]) == \
        ("manet_div", 0.01, 0.9, 1e-4, 15, 0.1, 128, 3)
    a = TrainConfig.from_preset("manet_affectnet", model_options={"gamma": 1.0})
    assert (a.protocol.epochs, a.optim.lr_step, a.model_options) == (20, 5, {"num_classes": 8, "gamma": 1.0})
    e = TrainConfig.from_preset("esr_affectnet")
    assert (e.protocol.name, e.protocol.lr_old, e.optim.lr_gamma, e.optim.batch_size) == ("esr_growth", 0.01, 0.5, 32)
    with pytest.raises(ValueError, match="manet_rafdb"):
        TrainConfig.from_preset("rafdb")
    # explicit options override the preset, even when they equal TrainConfig's defaults
    argv = ["train", "--preset", "manet_rafdb", "--model", "manet_div", "--batch-size", "32", "--weight-decay", "0",
            "--init-weights", "ms.pth", "--init-partial"]
    c = config_from_args(build_parser().parse_args(argv), argv)
    assert (c.model, c.data.dataset, c.optim.batch_size, c.optim.weight_decay, c.optim.lr, c.protocol.epochs,
            c.preset) == \
        ("manet_div", "rafdb", 32, 0.0, 0.01, 100, "manet_rafdb")
    assert (c.init.weights, c.init.partial) == ("ms.pth", True)
