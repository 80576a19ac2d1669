"""How the flow cuts work into task units and how big they must be (pure functions of nst_run.planning)."""

from __future__ import annotations

from nst_core.params import StyleParams
from nst_run.manifest import RowSpec
from nst_run.planning import (
    AUTO_MAX_ITEMS,
    CPU_UNIT_ITEMS,
    DispatchPace,
    ItemsInFlight,
    Outcome,
    Work,
    costliest_first,
    item_cost,
    plan_units,
    rows_costliest_first,
    unit_cost,
)


def _work(i: int, item: str | None = None, size: tuple[int, int] = (400, 300), **params: object) -> Work:
    style = StyleParams(**{"size": 64, "weights": "random:0", **params})  # type: ignore[arg-type]
    row = RowSpec(row=i, id=f"r{i}", content_uri="c.jpg", style_uri="s.jpg", params=style)
    return Work(row, item or f"{i:064x}", {"content": "a", "style": "b"}, "random:0", content_size=size)


def test_automatic_units_give_every_device_work_and_respect_the_dispatch_floor() -> None:
    works = [_work(i) for i in range(64)]
    assert [len(u) for u in plan_units(works, 0, devices=8)] == [8] * 8  # not one unit of 64 for one device
    assert [len(u) for u in plan_units(works, 0, devices=1)] == [64]  # one GPU: the worker sizes its batches
    assert [len(u) for u in plan_units(works, 0, devices=64)] == [1] * 64
    assert [len(u) for u in plan_units(works, 0, devices=64, min_items=16)] == [16] * 4
    assert [len(u) for u in plan_units(works * 2, 0, devices=1, min_items=500)] == [AUTO_MAX_ITEMS, AUTO_MAX_ITEMS]
    assert [len(u) for u in plan_units(works[:6], 4, devices=8, min_items=5)] == [6]  # whole optimisations of 4: two
    mixed = [_work(0), _work(1, size=(300, 400)), _work(2)]
    assert sorted(len(u) for u in plan_units(mixed, 0, devices=1)) == [1, 2]  # other shapes never share a unit


def test_cpu_units_hold_a_few_compatible_items() -> None:
    works = [_work(i) for i in range(20)]
    assert [len(u) for u in plan_units(works, 0, devices=1, max_items=CPU_UNIT_ITEMS)] == [8, 8, 4]
    assert [len(u) for u in plan_units(works, 0, devices=1, min_items=16, max_items=CPU_UNIT_ITEMS)] == [16, 4]  # the dispatch floor wins
    mixed = [_work(0), _work(1, size=(300, 400)), _work(2), _work(3, size=(300, 400))]
    assert sorted(len(u) for u in plan_units(mixed, 0, devices=1, max_items=CPU_UNIT_ITEMS)) == [2, 2]
    from nst_core.execution import CPU_BATCH_SIZES

    assert CPU_UNIT_ITEMS == max(CPU_BATCH_SIZES)  # a unit can fill the largest batch a CPU worker measures


def test_units_grow_when_the_flows_cost_per_unit_would_leave_devices_waiting() -> None:
    pace = DispatchPace()
    assert pace.min_items(64) == 1  # nothing measured yet
    pace.submitted(0.15)
    pace.collected(0.10)
    pace.item_time(1.0)
    assert pace.min_items(64) == 32  # 64 devices x 0.25 s per unit / 1 s per item, twice over
    assert pace.min_items(1) == 1
    assert pace.min_items(64, items_left=100_000) == 32
    # Near the end units shrink to sqrt(2 x items left x 0.25 s / 1 s): what the flow takes to hand them
    # out plus how ragged they leave the end is least there.
    assert pace.min_items(64, items_left=2_560) == 32  # sqrt(1280) = 35.8: the pace's own ask still holds
    assert pace.min_items(64, items_left=800) == 20
    assert pace.min_items(64, items_left=100) == 7  # 14 units: one item a unit would keep the flow busy 25 s
    assert pace.min_items(64, items_left=1) == 1
    for _ in range(50):
        pace.item_time(100.0)  # long items: one per unit keeps up
    assert pace.min_items(64) == 1


def test_the_cost_per_unit_is_per_unit_when_the_flow_submits_a_whole_window_at_once() -> None:
    pace = DispatchPace()
    for _ in range(128):  # the run's start: a window of 128 units submitted before any is collected
        pace.submitted(0.2)
    pace.collected(0.05)
    pace.item_time(30.0)
    assert abs(pace.cost_s - 0.25) < 1e-9  # not 128 x 0.2 s charged to the first unit collected
    assert pace.min_items(64, items_left=1_280) == 2  # ceil(2 x 64 x 0.25 / 30): not packs of 64 at 20 items per device
    assert pace.min_items(64, items_left=40) == 1  # sqrt(2 x 40 x 0.25 / 30) < 1


def test_rows_of_an_item_in_flight_join_it_and_all_get_its_outcome() -> None:
    flight = ItemsInFlight()
    new, known = flight.add([_work(1, "a" * 64), _work(2, "b" * 64)])
    assert [w.row.row for w in new] == [1, 2] and known == []
    cached = Outcome(row=4, id="r4", status="cached", item_id="c" * 64)
    new, known = flight.add([_work(3, "a" * 64), cached])  # row 3 of a later chunk asks for item a
    assert new == [] and known == [cached]
    done = Outcome(row=1, id="r1", status="succeeded", item_id="a" * 64, iterations=7)
    settled = flight.settle([done])
    assert [(o.row, o.status, o.iterations) for o in settled] == [(1, "succeeded", 7), (3, "succeeded", 7)]
    assert len(flight) == 1 and flight.settle([done]) == []


def test_the_costliest_units_are_dispatched_first_so_short_ones_fill_the_devices_ends() -> None:
    short, long_, big = _work(0, iterations=10), _work(1, iterations=150), _work(2, iterations=10, size=(1600, 1200))
    assert unit_cost([long_]) == 150 * 64 * 48 and unit_cost([short, short]) == 2 * unit_cost([short])
    assert unit_cost([big]) == unit_cost([short])  # what counts is the size it is optimised at
    coarse_to_fine = _work(4, iterations=10, scales=(0.5, 1.0))  # the coarse stage adds its own pixels
    assert unit_cost([coarse_to_fine]) == 10 * (32 * 24 + 64 * 48)
    order = costliest_first([[short], [long_], [big], [short, short], [coarse_to_fine]])
    assert [[w.row.row for w in u] for u in order] == [[1], [0, 0], [4], [0], [2]]  # equal costs keep their order


def test_items_of_different_shapes_are_packed_together_when_the_flow_needs_bigger_units() -> None:
    works = [_work(i, iterations=10 + i) for i in range(10)]  # ten batch keys: each its own group
    assert [len(u) for u in plan_units(works, 0, devices=4)] == [1] * 10  # no pressure: one task run each
    units = plan_units(works, 0, devices=4, min_items=4)
    assert [len(u) for u in units] == [4, 4, 2]  # the flow pays for three task runs, not ten
    assert sorted(w.row.row for u in units for w in u) == list(range(10))  # each item once
    big = [_work(100 + i) for i in range(8)]  # one group of 8 stays whole; the odd ones are packed
    units = plan_units(big + works[:3], 0, devices=1, min_items=3)
    assert sorted(len(u) for u in units) == [3, 8]


def test_the_whole_manifest_is_ordered_longest_first_before_any_row_is_resolved() -> None:
    rows = [_work(i, iterations=n).row for i, n in enumerate([10, 40, 10, 150, 40])]
    rows.append(_work(5, iterations=10, size=(64, 64), scales=(0.5, 1.0)).row)  # the coarse stage adds its pixels
    assert item_cost(rows[3].params, None) == 150 * 64 * 64  # size unknown before resolving: a square content
    assert item_cost(rows[3].params, (400, 300)) == unit_cost([_work(3, iterations=150)])
    assert [r.row for r in rows_costliest_first(rows)] == [3, 1, 4, 5, 0, 2]  # equal costs keep manifest order
    same = [_work(i).row for i in range(50)]
    assert rows_costliest_first(same) == same  # rows asking for the same work keep their order


def test_a_dask_fleet_keeps_no_unit_queued_on_a_worker_beyond_what_it_runs() -> None:
    from flows.stylize_manifest import Capacity

    # On dask a submitted unit is bound to one worker: one more per device would wait there even when
    # another device is idle, so the window is the task runs the workers run at once (three per device).
    assert Capacity(devices=64, tasks=192, cpu_only=False, where="dask", binds_early=True).window == 192
    # In-process a waiting task takes whichever device frees first: one more per device covers the reaction time.
    assert Capacity(devices=1, tasks=8, cpu_only=True, where="this process").window == 9
