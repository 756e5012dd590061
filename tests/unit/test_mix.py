import pytest

from sa_sft.config import load_config
from sa_sft.data.plan import check_self_supply
from sa_sft.mix.stage import mix_samples, split_heldout, split_ranks
from sa_sft.errors import UserError

TASK = [{"id": f"task-{i}", "messages": []} for i in range(100)]
SELF = [{"id": f"self-{i}", "messages": []} for i in range(80)]


def sources(mixed):
    return [row["source"] for row in mixed]


@pytest.mark.parametrize("ratio, expected_self", [(0.0, 0), (0.25, 25), (0.5, 50), (0.8, 80)])
def test_ratio_is_self_samples_per_task_sample(ratio, expected_self):
    mixed = mix_samples(TASK, SELF, ratio, seed=1)
    assert sources(mixed).count("task") == 100
    assert sources(mixed).count("self") == expected_self
    assert len({row["id"] for row in mixed}) == len(mixed)


def test_same_seed_same_order_other_seed_other_order():
    a = [row["id"] for row in mix_samples(TASK, SELF, 0.5, seed=1)]
    b = [row["id"] for row in mix_samples(TASK, SELF, 0.5, seed=1)]
    c = [row["id"] for row in mix_samples(TASK, SELF, 0.5, seed=2)]
    assert a == b and a != c and sorted(a) == sorted(c)
    # Shuffled: self-dialogues are spread through the data, not appended at the end.
    first_half = sources(mix_samples(TASK, SELF, 0.5, seed=1))[:75]
    assert 10 < first_half.count("self") < 40


def test_too_few_self_dialogues_is_a_clear_error():
    with pytest.raises(UserError, match="needs 100 self samples for 100 task rows but only 80"):
        mix_samples(TASK, SELF, 1.0, seed=1)


def test_ratio_in_tokens():
    task = [{"id": f"t{i}", "input_ids": [0] * 100} for i in range(10)]        # 1000 task tokens
    pool = [{"id": f"s{i}", "input_ids": [0] * 30} for i in range(100)]        # 30 tokens each
    mixed = mix_samples(task, pool, 0.5, seed=1, unit="tokens")
    self_tokens = sum(len(r["input_ids"]) for r in mixed if r["source"] == "self")
    assert 500 <= self_tokens < 530
    external = [{"id": f"e{i}", "input_ids": [0] * 50} for i in range(10)]
    mixed = mix_samples(task, pool, 0.5, seed=1, unit="tokens", external=external, external_ratio=0.2)
    assert sum(len(r["input_ids"]) for r in mixed if r["source"] == "external") == 200
    with pytest.raises(UserError, match="needs 1000 external tokens but only 500"):
        mix_samples(task, pool, 0.0, seed=1, unit="tokens", external=external, external_ratio=1.0)


def test_heldout_split_is_seeded_and_disjoint():
    train, held = split_heldout(TASK, 10, seed=3, name="task")
    assert len(held) == 10 and len(train) == 90
    assert not {r["id"] for r in held} & {r["id"] for r in train}
    assert split_heldout(TASK, 10, seed=3, name="task")[1] == held


def test_split_ranks_equal_lengths():
    parts = split_ranks(list(range(11)), 2)
    assert [len(p) for p in parts] == [5, 5]
    assert parts[0] == [0, 2, 4, 6, 8] and parts[1] == [1, 3, 5, 7, 9]


def test_self_supply_checked_before_generation():
    cfg = load_config("tiny", ["mix.self_ratio=2.0"])
    with pytest.raises(UserError, match="generate.num_samples \\(48\\) is too small"):
        check_self_supply(cfg, task_rows=999)
    check_self_supply(load_config("tiny"), task_rows=999)


def test_num_samples_can_follow_the_task_set():
    from sa_sft.data.plan import self_samples_needed
    cfg = load_config("tiny", ["generate.num_samples=-1", "mix.self_ratio=0.5"])
    # tiny: 48 task rows, 8 held out -> 40 train -> 20 self + 8 held-out self
    assert self_samples_needed(cfg, task_rows=999) == 28
    check_self_supply(cfg, task_rows=999)  # -1 never falls short


def test_compare_shares_one_generation_when_the_count_is_derived(tiny_model, tmp_path):
    """With generate.num_samples=-1 the generate inputs name mix.self_ratio, which differs between the
    methods of `sa-sft compare`: the copied generation would be refused. compare fixes the count once."""
    from sa_sft.compare import method_overrides, shared_generation
    from sa_sft.generate.stage import inputs
    from sa_sft.rundir import RunDir

    derived = ["generate.num_samples=-1"]
    cfg = load_config("tiny", derived)
    shared = shared_generation("tiny", derived, cfg, ["base", "task_only", "sa_sft"])
    assert shared == ["generate.num_samples=48"]  # lambda 1 x 40 training task rows + 8 held out
    # The largest lambda among the sa_sft methods sets the count; the smaller ones take a prefix.
    assert shared_generation("tiny", derived, cfg, ["sa_sft@0.5", "sa_sft@2", "task_only"]) == [
        "generate.num_samples=88"]
    method_inputs = lambda extra: {m: inputs(load_config("tiny", [*derived, *extra, *method_overrides(m, cfg)]),
                                             RunDir(tmp_path)) for m in ("sa_sft", "task_only")}
    unshared = method_inputs([])
    assert unshared["sa_sft"] != unshared["task_only"]
    fixed = method_inputs(shared)
    assert fixed["sa_sft"] == fixed["task_only"]
    assert shared_generation("tiny", [], load_config("tiny"), ["sa_sft"]) == []
