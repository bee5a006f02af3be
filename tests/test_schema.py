"""fer_lab.schema: the record names, against the literal names old run directories hold."""
from fer_lab import schema

#: columns of a history.csv written by an ESR*-2 run (the names of runs before the schema module)
OLD_COLUMNS = ["stage", "epoch", "global_epoch", "num_branches", "lr_all", "train_loss", "train_ce",
               "train_ce_branch_1", "train_ce_branch_2", "train_D_sp", "train_D_ch", "train_acc_vote",
               "train_acc_ensemble", "train_acc_branch_1", "train_acc_branch_10", "train_acc_branch_2",
               "train_S_offdiag_sp", "train_S_offdiag_max_sp", "train_karg_sp_q05", "train_karg_sp_q50",
               "train_karg_sp_q95", "train_gamma_sp", "train_karg_ch_q50", "train_gradnorm_ce", "train_gradnorm_D_sp",
               "train_gradnorm_total", "train_gradshare_D_sp", "val_D_sp", "val_acc_vote", "val_acc_ensemble",
               "val_acc_branch_1", "time_s"]


def test_names_are_the_recorded_ones():
    assert schema.col("val", schema.acc("vote")) == "val_acc_vote"
    assert schema.D("spatial") == schema.D("sp") == "D_sp" and schema.S("channel") == "S_ch"
    assert schema.karg("spatial", 0.05) == "karg_sp_q05" and schema.karg("b", 0.5) == "karg_b_q50"
    assert schema.S_offdiag("sp") == "S_offdiag_sp" and schema.S_offdiag_max("ch") == "S_offdiag_max_ch"
    assert schema.gradshare("spatial") == "gradshare_D_sp" and schema.gradnorm("total") == "gradnorm_total"
    assert schema.gamma("branch") == "gamma_b" and schema.ce("local") == "ce_local"


def test_parsing_an_old_history():
    c = OLD_COLUMNS
    assert schema.terms(c) == ["sp", "ch"] and schema.terms(c, "val") == ["sp"]
    assert schema.diagnosed_terms(c) == ["ch", "sp"]
    assert schema.gradshare_terms(c, "train") == ["sp"] and schema.gradnorm_parts(c) == ["ce", "D_sp", "total"]
    assert schema.heads(c, "val") == ["vote", "ensemble", "branch_1"]
    assert schema.learner_heads(c, "train") == ["branch_1", "branch_2", "branch_10"]     # by number, not text
    assert schema.decision_heads(c, "train") == ["vote", "ensemble"]
    assert schema.has_diversity(c) and not schema.has_diversity(["train_acc_vote"])
    # a phase's own dict (metrics.json "test", an epoch's scalars) has no phase prefix
    test = {"acc_fused": 0.5, "acc_local": 0.4, "acc_global": 0.3, "D_b": 0.9, "loss": 1.0, "gradshare_D_b": 0.1}
    assert schema.decision_heads(test, None) == ["fused", "local", "global"] and schema.terms(test, None) == ["b"]
    assert schema.gradshare_terms(test) == ["b"]
    assert schema.similarity_terms(["train_S_sp", "train_S_offdiag_sp", "val_S_ch", "stage"]) == ["sp"]
    assert schema.learner_index("patch_3") == 3 and schema.learner_index("vote") is None
