"""put_newest (neoplasma.core.bounded): the bound, which entry goes, what a put of a held key does; and the proxy
hub's maps put with their limits."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from neoplasma.core.bounded import put_newest
from neoplasma.core.resume import MIN_INSTANCE, Checkpoint
from neoplasma.proxy.hub import CHECKPOINTS_CACHED, CHECKPOINTS_KEPT, INSTANCES_KEPT, Hub


def test_the_oldest_put_goes_first_and_put_says_which() -> None:
    kept: dict[str, int] = {}
    assert [put_newest(kept, 3, k, v) for k, v in [("a", 1), ("b", 2), ("c", 3)]] == [None, None, None]
    assert put_newest(kept, 3, "d", 4) == ("a", 1)
    assert put_newest(kept, 3, "e", 5) == ("b", 2)
    assert list(kept.items()) == [("c", 3), ("d", 4), ("e", 5)]


def test_putting_a_held_key_replaces_its_value_where_it_stands() -> None:
    kept: dict[str, int] = {}
    put_newest(kept, 2, "a", 1)
    put_newest(kept, 2, "b", 2)
    assert put_newest(kept, 2, "a", 10) is None  # still two entries: nothing goes
    assert list(kept.items()) == [("a", 10), ("b", 2)]
    assert put_newest(kept, 2, "c", 3) == ("a", 10)  # "a" is still the oldest: putting it again did not make it newest


def test_a_key_removed_and_put_again_is_the_newest() -> None:
    kept: dict[str, int] = {}
    put_newest(kept, 2, "a", 1)
    put_newest(kept, 2, "b", 2)
    del kept["a"]
    put_newest(kept, 2, "a", 3)
    assert put_newest(kept, 2, "c", 4) == ("b", 2) and list(kept) == ["a", "c"]


@given(limit=st.integers(1, 4),
       steps=st.lists(st.tuples(st.booleans(), st.integers(0, 6), st.integers()), max_size=40))
def test_it_keeps_what_the_code_it_replaced_kept(limit: int, steps: list[tuple[bool, int, int]]) -> None:
    """Against the code it replaced at each site: assign into the dict, then delete its first key while over."""
    kept: dict[int, int] = {}
    model: dict[int, int] = {}
    for removing, key, value in steps:
        if removing:  # (as the sites pop entries: a broker back, an epoch revived)
            assert kept.pop(key, None) == model.pop(key, None)
            continue
        before = dict(model)
        model[key] = value
        while len(model) > limit:
            del model[next(iter(model))]
        dropped = put_newest(kept, limit, key, value)
        assert dropped == next(((k, v) for k, v in before.items() if k not in model), None)
        assert list(kept.items()) == list(model.items())


def test_what_the_hub_remembers_is_bounded_the_oldest_forgotten() -> None:
    """The hub's maps are put with their limits: pointer instances, its checkpoints, others' it resolved."""
    hub = Hub()
    hub.positions[1] = 0
    instances = []
    for _ in range(INSTANCES_KEPT + 2):  # each confirmed, then refused: its pointers still resolve here
        instances.append(hub.instance)
        hub.confirm(hub.instance)
        hub.redraw(hub.instance)
    assert list(hub.issued) == instances[2:]
    assert all(end is not None for _, end in hub.issued.values())  # each redraw ended its instance in place
    made = []
    hub.confirm(hub.instance)
    for seq in range(CHECKPOINTS_KEPT + 1):
        hub.positions[1] = seq + 1
        checkpoint = hub.make_checkpoint()
        assert checkpoint is not None
        made.append(checkpoint)
    assert hub.known_checkpoint(made[0].instance, made[0].counter) is None
    assert hub.known_checkpoint(made[1].instance, made[1].counter) == made[1] and len(hub.checkpoints) == len(made) - 1
    others = [Checkpoint.of(MIN_INSTANCE, k, {1: k}) for k in range(1, CHECKPOINTS_CACHED + 2)]
    for checkpoint in others:
        hub.keep_resolved(checkpoint)
    assert hub.known_checkpoint(MIN_INSTANCE, 1) is None and hub.known_checkpoint(MIN_INSTANCE, 2) == others[1]
    assert len(hub.resolved_checkpoints) == CHECKPOINTS_CACHED
