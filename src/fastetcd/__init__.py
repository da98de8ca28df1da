"""fastetcd: an etcd v3 API server with a compiled MVCC core."""

try:
    # Written at build time by setuptools-scm from git tags (pyproject.toml [tool.setuptools_scm]).
    from fastetcd._version import __commit_id__, __version__
except ImportError:  # a checkout that was never built (the compiled core would be missing too)
    __version__ = "0+unknown"
    __commit_id__ = None
# The etcd version fastetcd reports to clients (Status.version, /version): the one whose behaviour it follows.
# It stays 3.5 although fastetcd also serves etcd 3.7's KV.RangeStream: kube-apiserver finds RangeStream by
# calling it (Unimplemented means fall back), not by version, and a 3.6/3.7 version would promise the rest
# of those releases (README: "etcd API level and the version fastetcd reports").
ETCD_COMPAT_VERSION = "3.5.13"
# The cluster version etcd 3.5 reports in /version: major.minor.0 of the etcd API level.
ETCD_CLUSTER_VERSION = "3.5.0"
