"""Protocols, presets and the architecture details that change numbers silently.

Expectations come from the public scripts (numbers read there, written here independently
of fer_lab.presets) or from brute-force re-computations of what a module must do.
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fer_lab import runs
from fer_lab.models import build_model, build_model_from_config, count_parameters
from fer_lab.models.cbam import CBAM
from fer_lab.models.esr import ConvBlock
from fer_lab.protocols import make_protocol
from fer_lab.train import TrainConfig, plan_stages, train

from conftest import make_ferplus


def _perturb(model, seed=0):
    """Non-uniform CBAM gates (a uniform gate commutes with max-pooling, so placement would not
    show): sharper gate networks, random BatchNorm statistics and affine parameters everywhere."""
    from fer_lab.models import CBAM

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CBAM):
                m.spatial_gate.conv.weight.mul_(20)
                for p in m.channel_gate.parameters():
                    p.mul_(5)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(1 + 0.5 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.num_features, generator=g))
    return model


# ---- CBAM placement ------------------------------------------------------------------------
def test_conv_block_orders_against_hand_computation():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12)
    for position in ("after_pool", "before_pool"):
        blk = _perturb(ConvBlock(8, 16, 3, 0, True, True, position)).eval()
        y, (ca, sa) = blk(x)
        z = F.relu(blk.bn(blk.conv(x)))
        if position == "after_pool":
            ref, ca_ref, sa_ref = blk.cbam.reference_forward(F.max_pool2d(z, 2))
        else:
            r, ca_ref, sa_ref = blk.cbam.reference_forward(z)
            ref = F.max_pool2d(r, 2)
        torch.testing.assert_close(y, ref)
        torch.testing.assert_close(sa, sa_ref)
        assert sa.shape[-1] == (5 if position == "after_pool" else 10)


def test_cbam_position_changes_outputs_not_parameters():
    torch.manual_seed(1)
    a = _perturb(build_model("esr9_div", num_branches=2, width=0.25)).eval()
    assert a.cbam_position == "after_pool"                  # the diversity paper's code
    b = build_model("esr9_div", num_branches=2, width=0.25, cbam_position="before_pool").eval()
    assert count_parameters(a) == count_parameters(b) == count_parameters(build_model("esr9_div", num_branches=2,
                                                                                      width=0.25))
    b.load_state_dict(a.state_dict())
    x = torch.rand(3, 3, 96, 96)
    with torch.no_grad():
        oa, ob = a(x), b(x)
    assert oa.spatial_attention.shape == ob.spatial_attention.shape == (2, 3, 6, 6)
    rel = lambda u, v: float((u - v).abs().max() / v.abs().max())   # noqa: E731
    assert rel(oa.features, ob.features) > 1e-2 and rel(oa.spatial_attention, ob.spatial_attention) > 1e-2
    # the fused branch execution follows the same placement
    a.branch_execution = "fused"
    with torch.no_grad():
        torch.testing.assert_close(a(x).branch_logits, oa.branch_logits, atol=1e-5, rtol=1e-4)


def test_cbam_reduction_sets_every_hidden_layer():
    m = build_model("esr9_div", num_branches=2, width=0.25, cbam_reduction=4)
    cbams = [mod for mod in m.modules() if isinstance(mod, CBAM)]
    assert len(cbams) == 4 + 2 * 4                          # 4 base blocks, 4 per branch (SPEC)
    for cbam in cbams:
        first = cbam.channel_gate.mlp[0]
        assert first.out_features == max(1, first.in_features // 4)
    # the closed form of CBAM's parameters, summed over the blocks, is the only difference
    ref = build_model("esr9_div", num_branches=2, width=0.25)
    cbam_params = lambda c, r: 2 * c * max(1, c // r) + max(1, c // r) + c + 98 + 2   # noqa: E731
    chans = [cb.channel_gate.mlp[0].in_features for cb in cbams]
    assert count_parameters(m) - count_parameters(ref) == sum(cbam_params(c, 4) - cbam_params(c, 16) for c in chans)
    rebuilt = build_model_from_config(m.config)
    assert rebuilt.cbam_reduction == 4 and count_parameters(rebuilt) == count_parameters(m)
    rebuilt.load_state_dict(m.state_dict())
    assert count_parameters(build_model_from_config({k: v for k, v in m.config.items() if k != "cbam_reduction"})) \
        == count_parameters(ref)                            # configs written before the option: r = 16
    x = torch.rand(2, 3, 48, 48)
    m2 = build_model("esr9_div", num_branches=2, width=0.25, cbam_reduction=4, input_size=48).eval()
    with torch.no_grad():
        loop = m2(x).branch_logits
        m2.branch_execution = "fused"
        torch.testing.assert_close(m2(x).branch_logits, loop, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="cbam_reduction=0"):
        build_model("esr9_div", num_branches=2, cbam_reduction=0)


def test_cbam_uniform_init_starts_every_gate_at_one_half_and_learns():
    """cbam_init='uniform': every CBAM (base, branches, branches added later) gives sigmoid(0) = 0.5
    for any input, the zeroed parameters still get gradients, and one step makes the maps vary."""
    torch.manual_seed(0)
    m = build_model("esr9_div", num_branches=2, width=0.25, input_size=48, cbam_init="uniform", cbam_reduction=4)
    m.add_branch()
    x = torch.rand(6, 3, 48, 48) * torch.linspace(0.2, 1.0, 6)[:, None, None, None]
    out = m(x, return_all_attention=True)
    maps = [t for att in out.layer_attention.values() for t in att]
    assert len(maps) == 2 * (4 + 3 * 4)                     # (channel, spatial) of every CBAM
    assert maps and all(torch.equal(t, torch.full_like(t, 0.5)) for t in maps)
    # the random initialisation does not start uniform
    ref = build_model("esr9_div", num_branches=2, width=0.25, input_size=48)
    assert float(ref(x).spatial_attention.std()) > 0.01
    loss = m.loss(out, torch.arange(6) % 8).total
    loss.backward()
    cbams = [mod for mod in m.modules() if isinstance(mod, CBAM)]
    assert len(cbams) == 4 + 3 * 4
    assert all(float(c.channel_gate.mlp[-1].weight.grad.abs().sum()) > 0 for c in cbams)
    assert all(float(c.spatial_gate.bn.weight.grad.abs().sum()) > 0 for c in cbams)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    opt.step()
    with torch.no_grad():
        assert float(m.eval()(x).spatial_attention.std()) > 1e-4
    assert build_model_from_config(m.config).cbam_init == "uniform"
    assert build_model_from_config({k: v for k, v in m.config.items() if k != "cbam_init"}).cbam_init == "random"
    with pytest.raises(ValueError, match="cbam_init='zero'"):
        build_model("esr9_div", num_branches=2, cbam_init="zero")


def test_old_configs_rebuild_as_they_were_trained():
    m = build_model("esr9_div", num_branches=2, width=0.25)
    old = {k: v for k, v in m.config.items() if k not in ("cbam_position", "decision", "active_branches",
                                                           "diversity_scope", "channel_term_input",
                                                           "branch_bn_train_at_test")}
    rebuilt = build_model_from_config(old)
    assert (rebuilt.cbam_position, rebuilt.decision, rebuilt.main_head) == ("before_pool", "mean", "ensemble")
    assert build_model_from_config(m.config).cbam_position == "after_pool"


# ---- decision, active branches, diversity scope --------------------------------------------
def test_vote_is_the_decision_and_heads_are_scores():
    torch.manual_seed(2)
    m = build_model("esr9", num_branches=5, width=0.25).eval()
    assert m.main_head == "vote"
    with torch.no_grad():
        out = m(torch.rand(16, 3, 64, 64))
    heads = m.heads(out)
    assert all(h.shape == (16, 8) for h in heads.values())
    preds = out.branch_logits.argmax(-1)                    # (L, B)
    for i in range(16):
        counts = np.bincount(preds[:, i].numpy(), minlength=8)
        assert heads["vote"][i].argmax() == int(np.flatnonzero(counts == counts.max())[0])   # ties: lowest
    torch.testing.assert_close(heads["vote"].exp().sum(-1), torch.ones(16))
    assert build_model("esr9", num_branches=2, width=0.25, decision="mean").main_head == "ensemble"


def test_active_branches_loss_vote_and_diversity_scope():
    torch.manual_seed(3)
    x, y = torch.rand(6, 3, 64, 64), torch.randint(0, 8, (6,))
    for scope, run_branches in (("all", 4), ("active", 2)):
        m = build_model("esr9_div", num_branches=4, width=0.25, gamma=0.5, diversity_scope=scope).eval()
        m.active_branches = 2
        with torch.no_grad():
            out = m(x)
            lo = m.loss(out, y)
        assert out.branch_logits.shape[0] == run_branches and out.num_active == 2
        ce = sum(F.cross_entropy(out.branch_logits[l], y) for l in range(2))
        torch.testing.assert_close(lo.ce_total, ce)
        torch.testing.assert_close(out.probs, out.branch_logits[:2].softmax(-1).mean(0))
        assert set(m.heads(out)) == {"vote", "ensemble", "branch_1", "branch_2"}
        assert lo.similarity["spatial"].shape == (run_branches, run_branches)
    with pytest.raises(ValueError, match="active_branches"):
        m.active_branches = 5
    m.active_branches = 4
    assert m.active_branches is None and m.config["active_branches"] is None


def test_branch_bn_train_at_test_quirk():
    m = build_model("esr9", num_branches=2, width=0.25, branch_bn_train_at_test=True).eval()
    assert not m.base.blocks[0].bn.training
    assert all(b.convs.blocks[0].bn.training for b in m.branches)
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        alone = m(x[:1]).branch_logits[:, 0]
        batch = m(x).branch_logits[:, 0]
    assert (alone - batch).abs().max() > 1e-4               # batch statistics: a face's output depends on its batch
    plain = build_model("esr9", num_branches=2, width=0.25).eval()
    assert not any(mod.training for mod in plain.modules())


def test_channel_term_on_spatial_maps_matches_the_scripts_formula():
    """The authors' FER+/RAF-DB scripts call their channel formula on the (L, B, H, W) spatial
    maps: snm[i, j] = mean over b and w of exp(-gamma * sum_h (a_i - a_j)^2) (brute force here;
    fer_lab keeps the unit diagonal unless diagonal='reference')."""
    torch.manual_seed(4)
    gamma = 3.0
    m = _perturb(build_model("esr9_div", num_branches=3, width=0.25, gamma=gamma,
                             channel_term_input="spatial")).eval()
    with torch.no_grad():
        out = m(torch.rand(5, 3, 96, 96))
        lo = m.loss(out, torch.zeros(5, dtype=torch.long))
    a = out.spatial_attention.double()
    L, B, H, W = a.shape
    ref = torch.eye(L, dtype=torch.float64)
    for i in range(L):
        for j in range(L):
            if i != j:
                ref[i, j] = torch.exp(-gamma * ((a[i] - a[j]) ** 2).sum(dim=1)).mean()
    torch.testing.assert_close(lo.similarity["channel"].double(), ref, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(lo.similarity["channel"], lo.similarity["spatial"])


# ---- protocols -----------------------------------------------------------------------------
def test_finetune_parameter_groups_per_stage():
    cfg = TrainConfig(model="esr9_div", protocol="esr_finetune", init_weights="x", lr=0.1, lr_new=0.1, lr_old=0.02,
                      model_options={"num_branches": 3, "width": 0.25})
    m = build_model("esr9_div", num_branches=3, width=0.25)
    proto = make_protocol("esr_finetune", cfg, m.config)
    stages = proto.stages()
    ids = lambda mods: {id(p) for mod in mods for p in mod.parameters()}   # noqa: E731
    g0 = {g["name"]: g for g in proto.param_groups(proto.begin_stage(m, stages[0]), stages[0])}
    assert m.active_branches == 1
    assert {id(p) for p in g0["base+branch 1"]["params"]} == ids([m.base, m.branches[0]])
    assert {id(p) for p in g0["other branches"]["params"]} == ids(m.branches[1:])
    assert (g0["base+branch 1"]["lr"], g0["other branches"]["lr"]) == (0.1, 0.02)
    g2 = {g["name"]: g for g in proto.param_groups(proto.begin_stage(m, stages[2]), stages[2])}
    assert m.active_branches is None and m.num_active == 3
    assert {id(p) for p in g2["new branch"]["params"]} == ids([m.branches[2]])
    assert {id(p) for p in g2["base+other branches"]["params"]} == ids([m.base, *m.branches[:2]])
    assert (g2["new branch"]["lr"], g2["base+other branches"]["lr"]) == (0.1, 0.02)
    grow = make_protocol("esr_growth", cfg, m.config)
    assert grow.start_config()["num_branches"] == 1


@pytest.mark.parametrize("step_at,expected", [("end", [1.0, 1.0, 0.5, 0.5, 0.25]),
                                              ("start", [1.0, 0.5, 0.5, 0.25, 0.25])])
def test_lr_schedule_step_at_epoch_end_or_start(tiny_cfg, step_at, expected):
    """StepLR(2, 0.5) stepped after each epoch, or before it as the public ESR scripts do
    (the first decay one epoch early: their 9/10/10 blocks for step 10)."""
    path = train(tiny_cfg(model="esr9", protocol="single", epochs=5, lr_step=2, lr=0.02, lr_step_at=step_at,
                          name=step_at, model_options={"num_branches": 1, "width": 0.25}))
    lrs = pd.read_csv(path / "history.csv")["lr_all"].to_numpy()
    np.testing.assert_allclose(lrs / 0.02, expected)


def _finetune_cfg(tmp_path, init, **over):
    base = dict(model="esr9_div", model_options=dict(num_branches=2, width=0.25, gamma=1.0), dataset="synthetic",
                data_options=dict(num_samples=32), image_size=64, protocol="esr_finetune", init_weights=str(init),
                epochs=2, epochs_later=1, lr=0.05, lr_new=0.05, lr_old=0.01, batch_size=16, eval_batch_size=32,
                subset_per_class=4, output_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"),
                progress=False, figures=False, name="ft")
    base.update(over)
    return TrainConfig(**base)


def _branch_state(state, l):
    return {k: v for k, v in state.items() if k.startswith(f"branches.{l}.")}


@pytest.mark.parametrize("scope", ["all", "active"])
def test_finetune_run_from_a_fer_lab_checkpoint(tmp_path, affectnet_checkpoint, scope):
    cfg = _finetune_cfg(tmp_path, affectnet_checkpoint, name=f"ft-{scope}",
                        model_options=dict(num_branches=2, width=0.25, gamma=1.0, diversity_scope=scope))
    path = train(cfg)
    h = pd.read_csv(path / "history.csv")
    assert h["num_branches"].tolist() == [1, 1, 2] and h["stage"].tolist() == [0, 0, 1]
    assert h.loc[0, "lr_base_branch_1"] == 0.05 and h.loc[0, "lr_other_branches"] == 0.01
    assert h.loc[2, "lr_new_branch"] == 0.05 and h.loc[2, "lr_base_other_branches"] == 0.01
    assert "train_acc_branch_2" not in h or h["train_acc_branch_2"].iloc[:2].isna().all()  # not in the vote yet
    report = json.loads((path / "init_weights.json").read_text())
    assert report["source"] == "fer_lab" and report["loaded"] > 0 and not report["missing"]
    src = torch.load(affectnet_checkpoint, weights_only=True)["model"]
    stage1 = torch.load(path / "checkpoints" / "best_stage0.pt", weights_only=True)
    # branch 2 outside the loss in stage 1: untouched without diversity over it, moved by it otherwise
    moved = any(not torch.equal(v, src[k]) for k, v in _branch_state(stage1["model"], 1).items())
    assert moved == (scope == "all")
    assert (h["train_D_sp"].iloc[:2].notna().all()) == (scope == "all")
    cfgjson = json.loads((path / "config.json").read_text())
    assert cfgjson["protocol"] == "esr_finetune" and "main_fer_plus.py" in cfgjson["protocol_description"]
    m = runs.read_json(path / "metrics.json")
    assert m["selected"]["head"] == "vote" and "acc_ensemble" in m["test"]


def test_esr_rafdb_preset_new_heads_in_native_order(tmp_path, affectnet_checkpoint):
    """The esr_rafdb preset on a RAF-DB-format fixture: an 8-class AffectNet-style ESR* gets
    new 7-class heads in RAF-DB's own class order, ImageNet normalisation and RandomErasing."""
    root = _rafdb_fixture(tmp_path / "rafdb")
    common = dict(data_root=str(root), init_weights=str(affectnet_checkpoint), image_size=64, epochs=1, epochs_later=1,
                  batch_size=16, eval_batch_size=64, output_dir=str(tmp_path / "runs"),
                  cache_dir=str(tmp_path / "cache"), progress=False, figures=False)
    cfg = TrainConfig.from_preset("esr_rafdb", model_options=dict(num_branches=2, width=0.25), name="raf", **common)
    path = train(cfg)
    report = json.loads((path / "init_weights.json").read_text())
    assert report["new_heads"] and any(".fc." in k for k in report["dropped"])
    assert not any(".fc." in k for k in report["loaded_keys"]) and report["loaded"] > 0
    c = runs.read_json(path / "config.json")
    assert c["classes"] == ["surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"]
    assert c["train"]["data"]["image_normalize"] == "imagenet" and c["train"]["data"]["random_erasing"]
    assert len(runs.read_json(path / "metrics.json")["test"]["confusion"]) == 7
    with pytest.raises(ValueError, match="new_heads"):
        train(TrainConfig.from_preset("esr_rafdb", model_options=dict(num_branches=2, width=0.25),
                                      init_new_heads=False, name="raf-no-new-heads", **common))


def _rafdb_fixture(root: Path, per_class: int = 4) -> Path:
    """RAF-DB basic: EmoLabel/list_patition_label.txt (native labels 1..7) and
    Image/aligned/<name>_aligned.jpg (100x100 RGB)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    (root / "EmoLabel").mkdir(parents=True)
    (root / "Image" / "aligned").mkdir(parents=True)
    lines = []
    for split, count in (("train", per_class), ("test", 2)):
        n = 0
        for label in range(1, 8):
            for _ in range(count):
                n += 1
                name = f"{split}_{n:05d}.jpg"
                img = rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / "Image" / "aligned" / name.replace(".jpg", "_aligned.jpg"))
                lines.append(f"{name} {label}")
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return root


def test_finetune_from_the_official_format(tmp_path):
    from test_esr_official import write_official

    official = write_official(tmp_path / "esr_9", branches=[1, 2, 3], base="random")
    cfg = _finetune_cfg(tmp_path, official, model="esr9", model_options=dict(num_branches=2), epochs=1,
                        name="official")
    path = train(cfg)
    report = json.loads((path / "init_weights.json").read_text())
    assert report["source"] == "esr_official" and report["ignored"] == ["Net-Branch_3.pt"]
    assert report["converted"] == ["base.blocks.0.conv.weight"]
    assert runs.read_json(path / "config.json")["model"]["num_branches"] == 2
    with pytest.raises(ValueError, match="init_weights"):
        train(_finetune_cfg(tmp_path, official, init_weights=None, name="none"))


# ---- presets ---------------------------------------------------------------------------
# Numbers read in the public scripts (docs/reproduction.md), independently of fer_lab.presets.
SCRIPTS = {
    "esr_affectnet": dict(protocol="esr_growth", epochs=50, epochs_later=20, lr=0.1, lr_new=0.1, lr_old=0.01,
                          lr_step=10, lr_gamma=0.5, lr_step_at="start", optimizer="sgd", momentum=0.9,
                          weight_decay=0.0, batch_size=32, subset_per_class=5000, image_size=96,
                          train_transform="esr_train", image_normalize=None, random_erasing=False),
    "esr_ferplus": dict(protocol="esr_finetune", epochs=100, epochs_later=60, lr=0.1, lr_new=0.1, lr_old=0.02,
                        lr_step=10, lr_gamma=0.75, lr_step_at="start", optimizer="sgd", momentum=0.9,
                        weight_decay=0.0, batch_size=32, subset_per_class=5000, image_size=96, dataset="ferplus",
                        label_space="affectnet8", train_transform="esr_train", random_erasing=False),
    "esr_rafdb": dict(protocol="esr_finetune", epochs=100, epochs_later=60, lr=0.1, lr_new=0.1, lr_old=0.02,
                      lr_step=10, lr_gamma=0.75, lr_step_at="start", batch_size=32, subset_per_class=None,
                      image_size=96, dataset="rafdb", label_space=None, init_new_heads=True,
                      train_transform="rafdb_train", image_normalize="imagenet", random_erasing=True),
    "manet_affectnet": dict(protocol="single", epochs=20, lr=0.01, lr_step=5, lr_gamma=0.1, lr_step_at="end",
                            momentum=0.9, weight_decay=1e-4, batch_size=128, subset_per_class=5000, image_size=224,
                            train_transform="esr_train", image_normalize=None),
    "manet_ferplus": dict(protocol="single", epochs=100, lr=0.01, lr_step=15, lr_gamma=0.1, lr_step_at="end",
                          weight_decay=1e-4, batch_size=32, subset_per_class=5000, image_size=224,
                          train_transform="esr_train", label_space="affectnet8"),
    "manet_rafdb": dict(protocol="single", epochs=100, lr=0.01, lr_step=15, lr_gamma=0.1, lr_step_at="end",
                        weight_decay=1e-4, batch_size=128, subset_per_class=None, image_size=224,
                        train_transform="rafdb_train", image_normalize="imagenet", random_erasing=True),
    "manet_rafdb_original": dict(model="manet", protocol="single", epochs=100, lr=0.01, lr_step=15, lr_gamma=0.1,
                                 weight_decay=1e-4, batch_size=128, subset_per_class=None, image_size=224,
                                 train_transform="manet_train", image_normalize=None, random_erasing=False),
    "manet_affectnet_original": dict(model="manet", protocol="single", epochs=20, lr=0.01, lr_step=5, lr_gamma=0.1,
                                     weight_decay=1e-4, batch_size=128, train_transform="manet_train"),
}
PUBLISHED = {"esr_affectnet": 59.3, "esr_ferplus": 89.15, "esr_rafdb": 82.95, "manet_affectnet": 60.02,
             "manet_ferplus": 88.34, "manet_rafdb": 89.99, "manet_rafdb_original": 88.40,
             "manet_affectnet_original": 60.29}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_preset_matches_its_script(name):
    from fer_lab.presets import PRESETS, published_accuracy

    cfg = TrainConfig.from_preset(name, init_weights="weights")
    flat = cfg.flat()
    for key, value in SCRIPTS[name].items():
        assert flat[key] == value, key
    assert cfg.preset == name and published_accuracy(name) == PUBLISHED[name]
    assert PRESETS[name]["script"] and PRESETS[name]["differences"]
    stages = plan_stages(cfg)
    mcfg = build_model(cfg.model, **cfg.model_options).config
    if cfg.protocol.name == "esr_finetune":
        assert [s.epochs for s in stages] == [100] + [60] * 8
        assert stages[0].lrs == {"base+branch 1": 0.1, "other branches": 0.02}
        assert stages[1].lrs == {"base+other branches": 0.02, "new branch": 0.1}
    if cfg.model.startswith("esr"):
        assert mcfg["cbam_position"] == "after_pool" and mcfg["decision"] == "vote"
        assert mcfg["num_classes"] == (7 if name == "esr_rafdb" else 8)
    else:
        assert mcfg["chain_order"] == "ascending" and cfg.protocol.name == "single"
        assert mcfg["num_classes"] == (7 if "rafdb" in name else 8)
    if mcfg["diversity"]["terms"]:
        assert mcfg["diversity"]["gamma"] == 10.0 and mcfg["diversity"]["diagonal"] == "paper"


def test_preset_run_records_its_config_and_differences(tmp_path, affectnet_checkpoint):
    """A tiny run of the esr_ferplus preset on a FER+-format fixture: config.json holds the
    resolved config, the preset's name and where the run differs from it."""
    root = make_ferplus(tmp_path / "ferplus")
    cfg = TrainConfig.from_preset("esr_ferplus", data_root=str(root), init_weights=str(affectnet_checkpoint),
                                  model_options=dict(num_branches=2, width=0.25), image_size=64, epochs=1,
                                  epochs_later=1, batch_size=16, eval_batch_size=64, output_dir=str(tmp_path / "runs"),
                                  cache_dir=str(tmp_path / "cache"), progress=False, figures=False, name="preset")
    path = train(cfg)
    c = json.loads((path / "config.json").read_text())
    assert c["train"]["protocol"]["lr_old"] == 0.02 and c["train"]["optim"]["lr_step_at"] == "start" and c["protocol"] == "esr_finetune"
    assert c["preset"]["name"] == "esr_ferplus"
    assert set(c["preset"]["differs"]) == {"model_options", "image_size", "epochs", "epochs_later", "batch_size"}
    assert c["preset"]["differs"]["epochs"] == [100, 1]
    assert [s["lrs"] for s in c["stages"]] == [{"base+branch 1": 0.1, "other branches": 0.02},
                                               {"base+other branches": 0.02, "new branch": 0.1}]
    # reopened, the run rebuilds its splits as training built them: the hold-out of FER2013Train
    # (the copy has no FER2013Test) selects, FER2013Valid is reported, at the run's 64 px
    from fer_lab.train import holdout_split
    from fer_lab.utils import derive_seed

    run = runs.load_run(path)
    val, test = run.eval_dataset("val"), run.eval_dataset("test")
    train_targets = run.eval_dataset("train").targets
    _, held = holdout_split(train_targets, 0.1, derive_seed("holdout", "ferplus"))
    assert list(val.indices) == list(held) and (val.targets == train_targets[held]).all()
    assert len(test) == 2 * 8 and test[0][0].shape == (3, 64, 64) and val[0][0].shape == (3, 64, 64)
    recorded = json.loads((path / "dataset.json").read_text())["splits"]
    assert recorded["val"]["size"] == len(val) and recorded["val"]["fingerprint"] == val.dataset.fingerprint(val.indices)
    assert recorded["test"]["fingerprint"] == test.fingerprint()


def test_random_affine_is_bilinear_and_rafdb_pipeline():
    from torchvision.transforms import v2

    from fer_lab.data.transforms import build_transform

    esr = build_transform("esr_train", 96)
    affine = next(t for t in esr.transforms if isinstance(t, v2.RandomAffine))
    assert affine.interpolation == v2.InterpolationMode.BILINEAR
    raf = build_transform("rafdb_train", 96, normalize="imagenet", random_erasing=True)
    kinds = [type(t).__name__ for t in raf.transforms]
    assert kinds == ["RGB", "Resize", "RandomHorizontalFlip", "RandomApply", "ToDtype", "Normalize", "RandomErasing"]
    applied = raf.transforms[3]
    assert applied.p == 0.2 and [type(t).__name__ for t in applied.transforms] == ["RandomRotation", "RandomCrop"]
    assert applied.transforms[0].degrees == [-20.0, 20.0] and applied.transforms[1].padding == [32, 32, 32, 32]
    assert raf.transforms[-1].scale == (0.02, 0.25)
    out = raf(torch.randint(0, 256, (1, 100, 100), dtype=torch.uint8))
    assert out.shape == (3, 96, 96)
