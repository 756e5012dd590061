"""What `generate.schedule` changes, from the config alone: how many shards an engine holds and how
vLLM orders their requests."""
from sa_sft.config import load_config
from sa_sft.engines.actor import engine_kwargs
from sa_sft.engines.pool import stream_depth
from sa_sft.generate.strategies import ShardProgram


def test_one_shard_at_a_time_by_default():
    gcfg = load_config("tiny").generate
    assert gcfg.schedule == "shard" and stream_depth(gcfg) == 2
    assert "scheduling_policy" not in engine_kwargs(gcfg, "m", False, 0)


def test_streamed_engines_hold_enough_shards_to_fill_the_batch_earlier_shards_first():
    gcfg = load_config("tiny", ["generate.schedule=stream", "generate.max_num_seqs=128",
                                "generate.shard_size=48"]).generate
    # ceil(128 / 48) = 3 shards fill the batch; one more waits behind them
    assert stream_depth(gcfg) == 4
    assert engine_kwargs(gcfg, "m", False, 0)["scheduling_policy"] == "priority"
    sampling = {"strategy": "self_dialogue"}
    assert ShardProgram(0, 3, 8, sampling).priority < ShardProgram(0, 4, 8, sampling).priority
