"""Placement: every rank sees each expert exactly once, in global order, read from a rank that really stores it."""

import pytest

from dwdp_jax.placement import Placement, Pull, Segment


def _placements():
    """Default placements for every N in 2..8 and E in {8, 72, 256}, plus every more-redundant L for each."""
    for num_experts in (8, 72, 256):
        for num_ranks in range(2, 9):
            if num_experts < num_ranks:
                continue
            default = Placement.for_group(num_experts, num_ranks)
            yield default
            step = num_ranks - 1
            for local_experts in range(default.local_experts + step, num_experts - step + 1, step):
                yield Placement.for_group(num_experts, num_ranks, local_experts)


PLACEMENTS = list(_placements())


def _expert_ids(placement: Placement, rank: int) -> list[int]:
    """The global expert ids rank `rank` reads, rebuilt from the ranges the segments' sources really store."""
    ids = []
    for segment in placement.view_segments(rank):
        source = rank if segment.source == "local" else segment.source
        source_start, source_stop = placement.local_range(source)
        stored = list(range(source_start, source_stop))
        ids += stored[segment.offset:segment.offset + segment.count]
        assert len(stored[segment.offset:segment.offset + segment.count]) == segment.count, "read past the slab"
    return ids


def test_variants_include_redundant_placements():
    assert len(PLACEMENTS) > 200
    assert any(p.local_experts > p.num_experts / p.num_ranks and p.num_experts % p.num_ranks == 0 for p in PLACEMENTS)
    assert any(p.local_experts >= 2 * p.prefetch_experts for p in PLACEMENTS)


@pytest.mark.parametrize("placement", PLACEMENTS, ids=lambda p: f"E{p.num_experts}N{p.num_ranks}L{p.local_experts}")
def test_every_rank_reads_each_expert_once_in_global_order(placement):
    for rank in range(placement.num_ranks):
        assert _expert_ids(placement, rank) == list(range(placement.num_experts))
        segments = placement.view_segments(rank)
        assert [s.global_start for s in segments] == [0] + [s.global_stop for s in segments[:-1]]
        assert [s for s in segments if s.source == "local"] == [
            Segment("local", 0, placement.local_experts, placement.local_range(rank)[0])]


@pytest.mark.parametrize("placement", PLACEMENTS, ids=lambda p: f"E{p.num_experts}N{p.num_ranks}L{p.local_experts}")
def test_pulls_come_from_the_lowest_owner_never_self_one_per_owner(placement):
    for rank in range(placement.num_ranks):
        start, stop = placement.local_range(rank)
        pulls = placement.pulls(rank)
        owners = [p.owner for p in pulls]
        assert rank not in owners
        assert len(set(owners)) == len(owners), "pulls must be contiguous per owner"
        assert owners == sorted(owners)
        assert sum(p.count for p in pulls) == placement.num_experts - placement.local_experts
        for pull in pulls:
            assert pull.count > 0
            owner_start, owner_stop = placement.local_range(pull.owner)
            assert owner_start <= pull.global_start and pull.global_stop <= owner_stop, "owner must store the pull"
            assert pull.src_offset == pull.global_start - owner_start
            assert pull.global_stop <= start or pull.global_start >= stop, "never pull a local expert"
            for expert in range(pull.global_start, pull.global_stop):
                assert placement.owner(expert) == pull.owner
                assert min(r for r in range(placement.num_ranks)
                           if placement.local_range(r)[0] <= expert < placement.local_range(r)[1]) == pull.owner


@pytest.mark.parametrize("num_experts,num_ranks,local_experts,prefetch_experts", [
    (256, 3, 86, 85), (256, 5, 52, 51), (256, 7, 40, 36), (256, 4, 64, 64), (72, 4, 18, 18), (256, 2, 128, 128),
    (255, 2, 128, 127)])
def test_for_group_picks_the_least_redundant_placement(num_experts, num_ranks, local_experts, prefetch_experts):
    placement = Placement.for_group(num_experts, num_ranks)
    assert (placement.local_experts, placement.prefetch_experts) == (local_experts, prefetch_experts)


def test_uniform_and_memory_driven_local_experts():
    assert Placement.uniform(256, 4) == Placement(256, 4, 64, 64)
    assert Placement.for_group(72, 4, local_experts=24) == Placement(72, 4, 24, 16)
    assert Placement.for_group(256, 2, local_experts=200) == Placement(256, 2, 200, 56)


def test_reference_docstring_example_two_ranks():
    placement = Placement(256, 2, 200, 56)
    assert placement.local_range(0) == (0, 200) and placement.local_range(1) == (56, 256)
    assert placement.pulls(0) == (Pull(owner=1, src_offset=144, count=56, global_start=200),)
    assert placement.pulls(1) == (Pull(owner=0, src_offset=0, count=56, global_start=0),)
    assert placement.bytes_pulled_per_layer(0, bytes_per_expert=10) == 560


def test_redundant_three_rank_pulls_follow_the_lowest_owner():
    placement = Placement.for_group(256, 3)
    assert placement.pulls(2) == (Pull(0, 0, 86, 0), Pull(1, 1, 84, 86))
    assert placement.pulls(0) == (Pull(1, 1, 85, 86), Pull(2, 1, 85, 171))
    assert [placement.owner(e) for e in (0, 85, 86, 170, 171, 255)] == [0, 0, 1, 1, 2, 2]


def test_from_memory_picks_the_largest_local_slab_that_fits():
    bytes_per_expert, layers = 1000, 58

    def needed(local_experts):
        return bytes_per_expert * (layers * local_experts + 2 * (256 - local_experts))

    def from_memory(budget_bytes):
        return Placement.from_memory(256, 4, bytes_per_expert, budget_bytes, num_moe_layers=layers)

    assert from_memory(needed(64)) == Placement(256, 4, 64, 64)
    assert from_memory(needed(100) - 1).local_experts == 97
    assert from_memory(10 ** 12).local_experts == 253
    with pytest.raises(ValueError, match="budget_bytes_for_experts"):
        from_memory(needed(64) - 1)


@pytest.mark.parametrize("args,field", [
    ((8, 1, 8, 8), "num_ranks"),
    ((8, 2, 0, 1), "local_experts"),
    ((8, 2, 4, 0), "prefetch_experts"),
    ((8, 2, 3, 5), "prefetch_experts"),
    ((8, 2, 9, 1), "local_experts"),
    ((8, 2, 4, 3), "num_experts"),
    ((256, 3, 86, 84), "num_experts"),
    ((0, 2, 1, 1), "num_experts"),
    ((8.0, 2, 4, 4), "num_experts"),
])
def test_bad_placements_name_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        Placement(*args)


def test_bad_constructor_arguments_name_the_field():
    with pytest.raises(ValueError, match=r"local_experts.*18, 21, \.\.\., 69 \(step 3\)"):
        Placement.for_group(72, 4, local_experts=25)
    with pytest.raises(ValueError, match="local_experts"):
        Placement.for_group(72, 4, local_experts=17)
    with pytest.raises(ValueError, match="num_experts"):
        Placement.for_group(3, 4)
    with pytest.raises(ValueError, match="num_ranks"):
        Placement.for_group(256, 1)
    with pytest.raises(ValueError, match="num_ranks"):
        Placement.uniform(256, 3)
    with pytest.raises(ValueError, match="rank must be in"):
        Placement.uniform(256, 4).local_range(4)
    with pytest.raises(ValueError, match="expert must be in"):
        Placement.uniform(256, 4).owner(256)


def test_check_devices():
    Placement.uniform(256, 4).check_devices(4)
    with pytest.raises(ValueError, match="group of 4 ranks needs 4 devices, have 3"):
        Placement.uniform(256, 4).check_devices(3)
