"""The throw-away servers tests and benchmarks start, under one import (see the modules beside it)."""

from kvckpt.cli.local_server import (
    REDIS_CHECKPOINT_SETTINGS,
    REDIS_KEEP_FREED_MEMORY_ENV,
    RedisServer,
    find_binary,
    free_port,
    wait_until,
)
from tests.harness.base import Throwaway, redis_call
from tests.harness.cluster import RedisCluster, RedisReplicaPair, free_port_with_bus
from tests.harness.etcd import EtcdCluster, EtcdServer
from tests.harness.tls import RedisTLSServer, TLSFiles, find_tls_redis_server, make_tls_files

__all__ = [
    "REDIS_CHECKPOINT_SETTINGS",
    "REDIS_KEEP_FREED_MEMORY_ENV",
    "EtcdCluster",
    "EtcdServer",
    "RedisCluster",
    "RedisReplicaPair",
    "RedisServer",
    "RedisTLSServer",
    "TLSFiles",
    "Throwaway",
    "find_binary",
    "find_tls_redis_server",
    "free_port",
    "free_port_with_bus",
    "make_tls_files",
    "redis_call",
    "wait_until",
]
