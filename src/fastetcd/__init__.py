"""fastetcd: an etcd v3 API server with a compiled MVCC core."""

__version__ = "0.1.0"
# The etcd version fastetcd reports to clients (Status.version, /version): the one whose behaviour it follows.
ETCD_COMPAT_VERSION = "3.5.13"
# The cluster version etcd 3.5 reports in /version: major.minor.0 of the etcd API level.
ETCD_CLUSTER_VERSION = "3.5.0"
