"""Weight-decay grouping rules and the Muon routing rule: coverage and membership."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from model import GPT, GPTConfig, muon_param_split, weight_decay_groups
from model.param_groups import WEIGHT_DECAY_RULES, describe_groups

CFG = GPTConfig(block_size=8, vocab_size=23, n_layer=2, n_head=2, n_embd=8, bias=True)

HIDDEN_MATRICES = {
    f"transformer.h.{i}.{m}.weight"
    for i in range(CFG.n_layer)
    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
}


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG)


def all_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def assert_partition(model: nn.Module, groups) -> list[set[str]]:
    """Every parameter appears exactly once across the groups; return the name sets."""
    flat = [p for g in groups for p in g["params"]]
    assert len(flat) == len({id(p) for p in flat}), "a parameter appears twice"
    assert {id(p) for p in flat} == {id(p) for p in model.parameters()}
    return [set(names) for names in describe_groups(model, groups)]


def test_tied_weight_is_listed_once_under_wte(model):
    names = all_names(model)
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names


def test_linear_weights_rule(model):
    groups = weight_decay_groups(model, 0.1, rule="linear_weights")
    decay, no_decay = assert_partition(model, groups)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    # The tied head is an embedding here: not decayed. So are wpe, LayerNorms and biases.
    assert decay == HIDDEN_MATRICES
    assert no_decay == set(all_names(model)) - HIDDEN_MATRICES
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} <= no_decay
    assert all(n in no_decay for n in all_names(model) if n.endswith(".bias"))


def test_matrices_rule(model):
    decay, no_decay = assert_partition(model, weight_decay_groups(model, 0.2, rule="matrices"))
    assert decay == HIDDEN_MATRICES | {"transformer.wte.weight", "transformer.wpe.weight"}
    assert all(n.endswith(".bias") or ".ln_" in n for n in no_decay)


@pytest.mark.parametrize("rule, wd", [("all", 0.3), ("none", 0.0)])
def test_all_and_none_rules(model, rule, wd):
    groups = weight_decay_groups(model, 0.3, rule=rule)
    (only,) = assert_partition(model, groups)
    assert only == set(all_names(model)) and groups[0]["weight_decay"] == wd


def test_unknown_rule_lists_choices(model):
    with pytest.raises(ValueError) as err:
        weight_decay_groups(model, 0.1, rule="embeddings")
    for rule in WEIGHT_DECAY_RULES:
        assert rule in str(err.value)
    with pytest.raises(ValueError, match="weight_decay"):
        weight_decay_groups(model, -0.1)


def test_tied_head_registered_first_still_counts_as_embedding():
    # A model whose output head is registered before the embedding it shares a tensor with:
    # named_parameters() calls it "head.weight", but the rule must still treat it as an embedding.
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 10, bias=False)
            self.hidden = nn.Linear(4, 4)
            self.emb = nn.Embedding(10, 4)
            self.emb.weight = self.head.weight

    m = Tiny()
    decay, no_decay = assert_partition(m, weight_decay_groups(m, 0.1))
    assert decay == {"hidden.weight"} and no_decay == {"head.weight", "hidden.bias"}


def test_frozen_parameters_are_left_out():
    torch.manual_seed(0)
    m = GPT(CFG)
    m.transformer.wpe.weight.requires_grad_(False)
    groups = weight_decay_groups(m, 0.1, rule="all")
    assert all(p is not m.transformer.wpe.weight for g in groups for p in g["params"])
    muon, adamw = muon_param_split(m)
    assert all(p is not m.transformer.wpe.weight for p in muon + adamw)


def test_groups_drive_adamw_with_decoupled_decay_where_intended():
    torch.manual_seed(0)
    m = GPT(CFG)
    opt = torch.optim.AdamW(weight_decay_groups(m, 0.5), lr=0.1)  # raises on duplicates
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: only weight decay moves a parameter
    opt.step()
    for n, p in m.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (n in HIDDEN_MATRICES), n


# --- Muon routing ------------------------------------------------------------------------------


def test_muon_default_split(model):
    muon, adamw = muon_param_split(model, named=True)
    muon_names = {n for n, _ in muon}
    adamw_names = {n for n, _ in adamw}
    assert muon_names == HIDDEN_MATRICES
    assert adamw_names == set(all_names(model)) - HIDDEN_MATRICES
    assert all(p.dim() == 2 for _, p in muon)
    # Parameters themselves (not names) partition the model, each once.
    mp, ap = muon_param_split(model)
    ids = [id(p) for p in mp + ap]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_muon_include_exclude_patterns(model):
    muon, _ = muon_param_split(model, exclude=["*.mlp.c_proj.weight"], named=True)
    assert {n for n, _ in muon} == {n for n in HIDDEN_MATRICES if ".mlp.c_proj." not in n}

    muon, _ = muon_param_split(model, include=["transformer.h.*", "transformer.wte.weight"], named=True)
    assert {n for n, _ in muon} == HIDDEN_MATRICES | {"transformer.wte.weight"}

    # "*" matches everything, but vectors (norms, biases) can never go to Muon.
    muon, adamw = muon_param_split(model, include=["*"], named=True)
    assert all(p.dim() == 2 for _, p in muon)
    assert all(p.dim() != 2 for _, p in adamw)
    with pytest.raises(TypeError):
        muon_param_split(model, include="transformer.h.*")
