import os
import tempfile

import pytest

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
