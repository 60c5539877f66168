"""Locust users for the ``deltatune serve`` load run (bench/load_run.py starts the server and locust).

Each user sends ``POST /v1/generate`` for one of the precomputed cases (adapter, prompt ids,
max_new_tokens, greedy or seeded sampling) in ``$DELTATUNE_LOAD_CASES`` (JSON written by
load_run.py from the library's own ``generate`` on the same model) and checks the answer:
  * status >= 500                 -> failure "5xx ..."
  * other non-200                 -> failure "status ..."
  * output_ids != the library's   -> failure "leak ...": a row got another adapter's or seed's tokens
"""
from __future__ import annotations

import json
import os
import random

from locust import HttpUser, between, task

CASES = json.loads(open(os.environ["DELTATUNE_LOAD_CASES"]).read())


class Client(HttpUser):
    wait_time = between(0.0, 0.05)

    @task
    def generate(self) -> None:
        case = random.choice(CASES)
        with self.client.post("/v1/generate", json=case["request"], name=f"/v1/generate [{case['kind']}]",
                              catch_response=True) as r:
            if r.status_code >= 500:
                r.failure(f"5xx {r.status_code}")
            elif r.status_code != 200:
                r.failure(f"status {r.status_code}: {r.text[:100]}")
            elif r.json()["output_ids"] != case["expected"]:
                r.failure(f"leak: adapter {case['request']['adapter']} seed {case['request'].get('seed')}")
            else:
                r.success()
