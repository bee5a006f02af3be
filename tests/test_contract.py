"""The model contract (fer_lab.models.base), run on every registered model, and the third model
(TinyPair, one file) through the engine, Grad-CAM and the run figures."""
import json

import numpy as np
import pytest
import torch

from fer_lab.models import build_model, build_model_from_config, check_contract, list_models, model_spec

#: small versions of each family (the contract does not depend on size)
SMALL = {"esr": dict(num_branches=2, width=0.25, input_size=48), "manet": dict(input_size=112),
         "tiny": dict(width=4, input_size=32)}


def _small(name):
    family = model_spec(name).cls.family
    return build_model(name, **SMALL[family]), family


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_keeps_the_contract(name):
    torch.manual_seed(0)
    model, family = _small(name)
    side = model.config["input_size"]
    K = model.config["num_classes"]
    x, y = torch.rand(3, 3, side, side), torch.tensor([0, 1, 2])
    seen = check_contract(model, x, y)
    assert seen["classes"] == K and model.main_head in seen["heads"]
    # independent expectations per family: the learners each architecture has
    L = {"esr": 2, "manet": 4, "tiny": 2}[family]
    assert seen["learners"]["spatial"][:2] == (L, 3) and seen["learners"]["channel"][:2] == (L, 3)
    if family == "esr":
        att = model.config["attention"]
        assert seen["attention_layers"] == (["last", "block0", "block1", "block2", "block3",
                                             "base.0", "base.1", "base.2", "base.3"] if att else [])
        assert ("vote" in seen["heads"]) and seen["cam_targets"] == ["base", "branch_1", "branch_2"]
        if att:
            assert seen["attention_learners"]["last"] == ["branch_1", "branch_2"]
            assert seen["channel_learners"] == ["branch_1", "branch_2"]
    elif family == "manet":
        assert seen["heads"] == ["fused", "global", "local"] and seen["attention_layers"] == ["last"]
        assert seen["channel_learners"] == ["patch_1", "patch_2", "patch_3", "patch_4"]
    else:
        assert seen["heads"] == ["ensemble", "learner_1", "learner_2"] and seen["attention_layers"] == []
    # config round trip: same parameters, same outputs
    rebuilt = build_model_from_config(json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        a, b = model.heads(model(x)), rebuilt.heads(rebuilt(x))
    torch.testing.assert_close(a[model.main_head], b[model.main_head])


def test_contract_check_names_what_broke():
    model = build_model("tiny_pair", width=4, input_size=32)
    model.heads = lambda out: {"ensemble": out.logits[:, 0]}          # (B,) instead of (B, K)
    with pytest.raises(AssertionError, match=r"heads\(\)\['ensemble'\] is \(2,\), expected \(B, K\)"):
        check_contract(model, torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))


def test_tiny_pair_is_one_file_through_the_engine(tmp_path):
    """The third model trains, resumes, selects, reports and draws with no engine change."""
    from fer_lab.cam import grad_cam_per_learner
    from fer_lab.runs import load_run
    from fer_lab.train import TrainConfig, train

    cfg = TrainConfig(model="tiny_pair_div", model_options=dict(width=4), dataset="synthetic",
                      data_options=dict(num_samples=48), image_size=32, epochs=2, batch_size=16,
                      eval_batch_size=48, lr=0.01, optimizer="adam", output_dir=str(tmp_path / "runs"),
                      cache_dir=str(tmp_path / "cache"), progress=False, figures=True, name="tiny")
    run_dir = train(cfg)
    run = load_run(run_dir)
    assert run.metrics["selected"]["head"] == "ensemble"
    assert {"train_D_sp", "train_D_ch", "val_acc_learner_2", "train_gradshare_D_sp"} <= set(run.history.columns)
    assert len(run.history) == 2 and np.isfinite(run.history["train_loss"]).all()
    net = run.load_model()
    x = torch.stack([run.eval_dataset("test")[i][0] for i in range(2)])
    cams = grad_cam_per_learner(net, x)
    assert sorted(cams) == ["ensemble", "learner_1", "learner_2"] and all(c.shape == (2, 32, 32) for c in cams.values())
    assert (run_dir / "figures" / "determinant_trends.png").is_file()
