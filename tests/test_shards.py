"""Shard sample estimates and the dataset-length sanity check (a user's own shards with a recipe's length)."""

import json

from train.data import write_shards
from train.shards import dataset_length_warning, estimate_samples


def _shards(tmp_path, n_shards: int, per_shard: int) -> list[str]:
    samples = [(f"s{i:05d}", None, f"caption {i}") for i in range(n_shards * per_shard)]
    return write_shards(samples, tmp_path, "own", maxcount=per_shard)


def test_estimate_counts_samples_not_members(tmp_path):
    shards = _shards(tmp_path, 3, 7)  # 21 samples, one member each (caption only)
    assert estimate_samples(str(tmp_path / "own-*.tar")) == 21
    assert estimate_samples(shards, max_scan=1) in range(15, 28)  # one shard counted, the rest by size


def test_img2dataset_stats_take_precedence(tmp_path):
    shards = _shards(tmp_path, 2, 5)
    (tmp_path / "own-000000_stats.json").write_text(json.dumps({"successes": 1000}))
    assert estimate_samples(shards) == 1000 + 5


def test_warning_when_length_is_off_by_more_than_2x(tmp_path):
    _shards(tmp_path, 2, 10)
    pattern = str(tmp_path / "own-{000000..000001}.tar")
    warn = dataset_length_warning(3_582_893 * 8, pattern)
    assert warn is not None and "about 20 samples" in warn and "data.dataset_length=20" in warn
    assert dataset_length_warning(30, pattern) is None  # within 2x
    assert dataset_length_warning(None, pattern) is None
    assert estimate_samples("https://example.com/a-{0..3}.tar") is None  # remote: no estimate
