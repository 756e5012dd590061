"""Every random choice derives from the run seed: a seed is a pure function of the run seed and names."""
import hashlib


def derive_seed(*parts) -> int:
    """A 31-bit seed that is a pure function of its parts (run seed, stage, shard, item, step)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
