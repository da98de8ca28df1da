"""Key-range helpers with etcd's conventions (the package's own, re-exported for tests)."""

from fastetcd.keys import prefix_end

__all__ = ["prefix_end"]
