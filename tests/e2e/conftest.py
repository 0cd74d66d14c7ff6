import pytest
from support.loop import LoopThread
from support.tiny_models import build_with_tokenizer


@pytest.fixture(scope="module")
def e2e_deployment(ray_session):
    """A real deployment (2 expert-group actors, 1 gating actor) of a tiny model with a tokenizer."""
    from moeray.actors.deploy import deploy
    from moeray.common.config import ServeConfig

    dep = deploy(ServeConfig(dtype="float32",
                             model=str(build_with_tokenizer()), num_expert_groups=2, kv_cache_blocks=256))
    yield dep
    dep.shutdown()


@pytest.fixture(scope="module")
def real_backends(e2e_deployment):
    from moeray.actors.backend import backends_for

    return backends_for(e2e_deployment)


@pytest.fixture(scope="module")
def loop_thread():
    """The servers' event loop, in a daemon thread (one per module)."""
    loop = LoopThread()
    yield loop
    loop.close()
