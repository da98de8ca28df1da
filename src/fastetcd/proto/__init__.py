"""Python code generated from proto/fastetcd/proto (etcd v3.5 API); regenerate with ci/gen_proto.sh."""
