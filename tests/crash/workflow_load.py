"""Workflow load for the crash harness: flow runs started and worked on while the server is
killed. Used only when the workflow layer (pgflow.start_flow) exists."""

import psycopg


def available(cluster):
    with cluster.connect() as conn:
        return conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'start_flow' "
            "AND pronamespace = 'pgflow'::regnamespace)").fetchone()[0]


def define(cluster):
    raise NotImplementedError


class Load:
    def __init__(self, cluster, cycle, rng):
        raise NotImplementedError
