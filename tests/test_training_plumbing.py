import math

import pytest
import torch
from torch import nn

from mask2former.training.distributed import ShardedSampler
from mask2former.training.optim import build_optimizer, lr_factor, parameter_groups


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4))
        self.query_feat = nn.Embedding(3, 4)
        self.head = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.level_embed = nn.Parameter(torch.zeros(3, 4))
        self.relative_position_bias_table = nn.Parameter(torch.zeros(5, 2))


def test_parameter_groups_follow_official_rules():
    groups = {
        g["name"]: g for g in parameter_groups(Toy(), lr=1e-4, weight_decay=0.05, backbone_multiplier=0.1)
    }
    assert groups["backbone.0.weight"]["lr"] == pytest.approx(1e-5)
    assert groups["backbone.0.weight"]["weight_decay"] == 0.05
    assert groups["backbone.1.weight"]["weight_decay"] == 0.0  # norm inside the backbone
    assert groups["query_feat.weight"]["weight_decay"] == 0.0
    assert groups["norm.bias"]["weight_decay"] == 0.0
    assert (
        groups["head.weight"]["lr"] == pytest.approx(1e-4) and groups["head.weight"]["weight_decay"] == 0.05
    )
    assert groups["level_embed"]["weight_decay"] == 0.05  # a plain Parameter keeps its decay
    assert groups["relative_position_bias_table"]["weight_decay"] == 0.0
    optimizer = build_optimizer(Toy())
    assert isinstance(optimizer, torch.optim.AdamW)


def test_poly_and_step_schedules():
    assert lr_factor(0, 100) == 1.0
    assert lr_factor(50, 100) == pytest.approx(0.5**0.9)
    assert lr_factor(100, 100) == 0.0
    assert lr_factor(10, 100, "step", milestones=(5, 20)) == pytest.approx(0.1)
    assert lr_factor(25, 100, "step", milestones=(5, 20)) == pytest.approx(0.01)
    assert lr_factor(0, 100, warmup_iters=10, warmup_factor=0.001) == pytest.approx(0.001)
    assert math.isclose(lr_factor(5, 100, "cosine"), 0.5 * (1 + math.cos(math.pi * 0.05)))


def test_sharded_sampler_splits_the_global_order():
    single = ShardedSampler(10, seed=3, rank=0, world_size=1)
    shards = [ShardedSampler(10, seed=3, rank=r, world_size=2) for r in range(2)]
    one = next(single.batches(epoch=1, batch_size=4))
    two = [next(s.batches(epoch=1, batch_size=2)) for s in shards]
    assert sorted(one) == sorted(two[0] + two[1])
    assert single.global_order(0) != single.global_order(1)  # reshuffled per epoch
    assert sorted(single.shard(0)) == list(range(10))
    uneven = [ShardedSampler(7, seed=0, rank=r, world_size=2) for r in range(2)]
    assert len(uneven[0].shard(0)) == len(uneven[1].shard(0)) == 4
