import io
import os
import tarfile
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["s3_server"]  # the moto S3 fixtures (moto, shards) of the S3 tests

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the session, with its own short temp dir (never a global ray stop)."""
    import ray

    tmp = tempfile.mkdtemp(prefix="hs-t-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp,
             runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


def write_corrupt_shard(src: Path, dst: Path, member: str = "00000005.png") -> Path:
    """A copy of the WebDataset shard ``src`` at ``dst`` whose ``member`` is garbage, not a PNG
    (``from conftest import write_corrupt_shard``)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin.getmembers():
            payload = tin.extractfile(info).read()
            if info.name == member:
                payload = b"\x89PNG garbage, not an image" * 3
                info.size = len(payload)
            tout.addfile(info, io.BytesIO(payload))
    return dst
