"""SIGTERM on the native transport: in-flight calls finish and are answered, watch streams end, new
connections are refused, and the process exits 0 (the README's promise), with grpc-go's two GOAWAYs.

The in-flight call is a Range whose 1 MiB answer waits on the client's flow-control window: a client that
does not read yet holds it in flight for as long as the test wants, so the test does not race the server.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import grpc
from h2_frames import FrameClient, grpc_message

from fastetcd.proto import rpc_pb2, rpc_pb2_grpc
from fastetcd.testing.process import start_fastetcd

VALUE = b"v" * (512 * 1024)
NO_ERROR = 0
LAST_STREAM_NOTICE = 2**31 - 1  # the shutdown notice's stream id: "all streams still welcome"


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_finishes_in_flight_calls_and_ends_watches(tmp_path: Path) -> None:
    server = start_fastetcd(tmp_path, ["--transport", "native", "--store", "embedded"])
    try:
        with grpc.insecure_channel(server.endpoint) as ch:
            kv = rpc_pb2_grpc.KVStub(ch)
            for i in range(2):
                kv.Put(rpc_pb2.PutRequest(key=b"big/%d" % i, value=VALUE), timeout=10)

            # A watch stream, open when the signal comes.
            watch_end: dict[str, object] = {}
            create = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=b"w"))
            responses = rpc_pb2_grpc.WatchStub(ch).Watch(iter([create]), timeout=60)
            assert next(responses).created

            def drain_watch() -> None:
                try:
                    for _ in responses:
                        pass
                    watch_end["code"] = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    watch_end["code"] = e.code()
                watch_end["at"] = time.monotonic()

            watcher = threading.Thread(target=drain_watch, daemon=True)
            watcher.start()

            # The in-flight Range: its answer (1 MiB) is stuck behind the 64 KiB default window.
            client = FrameClient(server.port)
            request = rpc_pb2.RangeRequest(key=b"big/", range_end=b"big0").SerializeToString()
            client.request(1, "/etcdserverpb.KV/Range", request)
            time.sleep(0.3)  # let the server take the call

            sigterm_at = time.monotonic()
            os.killpg(server.pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not refused(server.port):  # the listener closes first
                assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
                time.sleep(0.02)

            # Now read: the whole answer and OK trailers arrive, between the two GOAWAYs and the close.
            client.read_until(lambda: 1 in client.ended, timeout=10)
            client.read_to_eof(timeout=10)
            head, trailers = client.headers[1]
            assert head[":status"] == "200" and trailers["grpc-status"] == "0", client.headers
            answer = rpc_pb2.RangeResponse.FromString(client.data[1][5:])
            assert client.data[1][:5] == grpc_message(b"\0" * (len(client.data[1]) - 5))[:5]
            assert [kv.key for kv in answer.kvs] == [b"big/0", b"big/1"]
            assert all(kv.value == VALUE for kv in answer.kvs)
            assert [(last, code) for last, code, _ in client.goaways] == [
                (LAST_STREAM_NOTICE, NO_ERROR), (1, NO_ERROR)], client.goaways
            client.close()

            # The watch ended with UNAVAILABLE (clientv3 reconnects it), right away, not at the grace's end.
            watcher.join(10)
            assert watch_end.get("code") == grpc.StatusCode.UNAVAILABLE, watch_end
            assert float(watch_end["at"]) - sigterm_at < 1.9  # type: ignore[arg-type]

        assert server.proc.wait(timeout=15) == 0, server.log_tail()
        assert "stopped" in server.output()
    finally:
        server.kill()
