"""The server layer: etcd's gRPC services over the engine, and the transports that carry them."""
