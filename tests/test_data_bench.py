import pytest

from lit_diffusion.bench.data import bench_data
from lit_diffusion.data.shapes import write_shapes


@pytest.mark.timeout(300)
def test_bench_reports_both_rates(tmp_path):
    summary = write_shapes(tmp_path, train=96, val=0, size=16, shard_size=32)
    result = bench_data(summary["urls"]["train"], image_size=16, batch_size=16, num_samples=64, repeats=1)
    assert result["num_samples"] == 64 and result["num_workers"] == 1
    assert result["datamodule_samples_per_s"] > 0 and result["raw_samples_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["datamodule_samples_per_s"] / result["raw_samples_per_s"])
    assert result["cpu_ratio"] > 0
    assert sum(result["skipped"].values()) == 0
