"""/readyz is not ready until an inference worker has its model loaded, and says why not.

The model check reads the workers' real heartbeats in a real Redis, as /readyz does.
"""

from __future__ import annotations

import redis as redis_lib
from services import redis_server

from cxrnode.jobs.tracking import Heartbeat, live_workers
from cxrnode.web.health import _model


def test_the_model_check_fails_while_loading_and_after_a_failed_load_and_passes_once_loaded() -> (
    None
):
    with redis_server() as url:
        client = redis_lib.Redis.from_url(url)
        assert _model(live_workers(client)) == (False, "no live inference worker")
        beat = Heartbeat(client, "infer-1@gpu-host", ["infer"])
        beat.publish()
        ok, detail = _model(live_workers(client))
        assert not ok and detail.startswith("loading on 1 of 1 inference workers"), detail

        beat.set_state(model="unavailable", model_error="no config.json in /models/cxr")
        ok, detail = _model(live_workers(client))
        assert (ok, detail) == (False, "not loadable: no config.json in /models/cxr")

        other = Heartbeat(client, "infer-2@gpu-host", ["infer"])
        other.publish()
        ok, detail = _model(live_workers(client))
        assert not ok and "loading on 1 of 2" in detail and "no config.json" in detail

        other.set_state(model="loaded", model_id="cxr-llava-v2", device="cuda:0")
        ok, detail = _model(live_workers(client))
        assert ok and detail.startswith("loaded on 1 of 2 inference workers"), detail
        assert _model(None) == (False, "unknown: the broker cannot be asked")
